//! Monitoring: the metrics the alerts and the dashboard stand on, read from the real server's
//! `/metrics`: the count of batches paused by their failure threshold, each instance's
//! readiness as `/readyz` would answer it, and the series that exist from the start.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Backend, TestDb, TestServer, eventually, mobile, rfc3339_in};

/// Only stops a stuck test.
const SHORT: Duration = Duration::from_secs(120);

/// The value of one series of the server's `/metrics` (`name` or `name{label="value"}`, written
/// as the server writes it), or `None` when it has no such series.
pub(crate) fn metric(server: &TestServer, series: &str) -> Option<f64> {
    let reply = server.get("/metrics");
    assert_eq!(reply.status, 200, "GET /metrics: {}", reply.body);
    reply.body.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(value.trim().parse().unwrap())
    })
}

/// Creates and starts a batch through the simulator of `good` numbers that succeed followed by
/// `failing` numbers that fail for good (ending `0001`), with `failure_threshold` 0.2.
pub(crate) fn start_failing_batch(server: &TestServer, good: u64, failing: u64) -> String {
    let recipients: Vec<Value> = (0..good)
        .map(|i| json!({"phone": mobile(40_000_000 + i * 10)}))
        .chain((0..failing).map(|i| json!({"phone": format!("+86139{i:04}0001")})))
        .collect();
    let id = server.create_batch(&json!({
        "name": "failing", "content": "Your code is 1234.", "provider": "simulator",
        "failure_threshold": 0.2, "recipients": recipients,
    }));
    server.action_ok(&id, "start", "preparing");
    id
}

/// The reason of a batch's `Paused` condition, if it has one that is true.
fn paused_reason(batch: &Value) -> Option<String> {
    let paused = batch["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Paused" && c["status"] == "True")?;
    Some(paused["reason"].as_str()?.to_owned())
}

/// A batch that pauses itself on its failure threshold counts once in
/// `smsbatch_failure_threshold_pauses_total`; a batch an operator pauses does not count.
#[test]
fn a_pause_by_the_failure_threshold_is_counted() {
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(
        &db,
        &[
            ("SMSBATCH__SMSBATCH__FAILURE_WINDOW", "20"),
            // Slow enough that the batch pauses long before its last message.
            ("SMSBATCH__PROVIDERS__SIMULATOR__RATE_LIMIT", "200"),
        ],
    );
    let counter = "smsbatch_failure_threshold_pauses_total";
    assert_eq!(
        metric(&server, counter),
        Some(0.0),
        "exposed from the start"
    );

    // An operator's pause (of a batch scheduled for later) is not the threshold's.
    let scheduled = server.create_batch(&json!({
        "name": "later", "content": "Hello.", "schedule_at": rfc3339_in(Duration::from_secs(3600)),
        "recipients": [{"phone": mobile(1)}],
    }));
    server.action_ok(&scheduled, "start", "scheduled");
    server.action_ok(&scheduled, "pause", "paused");
    assert_eq!(
        paused_reason(&server.batch(&scheduled)).as_deref(),
        Some("Requested")
    );
    assert_eq!(metric(&server, counter), Some(0.0));

    let id = start_failing_batch(&server, 10, 2_000);
    let batch = server.wait_until(&id, "paused by itself", SHORT, |b| b["state"] == "paused");
    assert_eq!(
        paused_reason(&batch).as_deref(),
        Some("FailureThresholdExceeded"),
        "{batch:#}"
    );
    assert_eq!(metric(&server, counter), Some(1.0));
}

/// The series a dashboard panel takes a rate of exist at zero from the start, for every
/// configured provider and every step: a series that first appears above zero is not counted
/// as an increase by Prometheus, so the first messages after a start would never show.
#[test]
fn rated_series_exist_from_the_start() {
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(&db, &[]);
    for series in [
        r#"smsbatch_messages_total{outcome="sent",provider="simulator"}"#,
        r#"smsbatch_messages_total{outcome="retried",provider="simulator"}"#,
        r#"smsbatch_messages_total{outcome="failed",provider="simulator"}"#,
        r#"smsbatch_messages_total{outcome="opted_out",provider="simulator"}"#,
        r#"smsbatch_provider_request_seconds_count{provider="simulator"}"#,
        r#"smsbatch_step_restarts_total{step="preparation"}"#,
        r#"smsbatch_step_restarts_total{step="delivery"}"#,
    ] {
        assert_eq!(metric(&server, series), Some(0.0), "{series}");
    }
}

/// `smsbatch_ready{check}` says what `/readyz` says: 1 for each check while the instance reaches
/// its database and broker; 0 for the database while it refuses connections, and 1 again once it
/// takes them back.
#[test]
fn the_readiness_gauge_follows_the_database() {
    let db = TestDb::new(Backend::PostgresRabbitmq);
    let server = TestServer::start(&db, &[]);
    let database = r#"smsbatch_ready{check="database"}"#;
    let queue = r#"smsbatch_ready{check="queue"}"#;
    // The broker link comes up a moment after the server listens.
    eventually("ready", SHORT, || match server.get("/readyz") {
        reply if reply.status == 200 => Ok(()),
        reply => Err(reply.body),
    });
    assert_eq!(metric(&server, database), Some(1.0));
    assert_eq!(metric(&server, queue), Some(1.0));

    let name = db.url().rsplit('/').next().unwrap().to_owned();
    db.execute_on_server(&format!(
        "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
    ));
    eventually("unready", SHORT, || match metric(&server, database) {
        Some(0.0) => Ok(()),
        other => Err(format!("{database} is {other:?}")),
    });
    let readyz = server.get("/readyz");
    assert_eq!(readyz.status, 503, "{}", readyz.body);
    assert_eq!(
        metric(&server, queue),
        Some(1.0),
        "the broker is still reachable"
    );

    db.execute_on_server(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"));
    eventually("ready again", SHORT, || match metric(&server, database) {
        Some(1.0) => Ok(()),
        other => Err(format!("{database} is {other:?}")),
    });
    assert_eq!(server.get("/readyz").status, 200);
}
