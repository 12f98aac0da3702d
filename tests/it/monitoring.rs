//! Monitoring: the metrics the alerts of `deploy/prometheus/alerts.yml` stand on, read from
//! the real server's `/metrics` (the count of batches paused by their failure threshold, each
//! instance's readiness as `/readyz` would answer it), and the compose stack's monitoring run
//! natively, Debian's Prometheus on the shipped configuration scraping two instances and
//! RabbitMQ, with the dashboard's queries and the alerts checked through its HTTP API.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use regex::Regex;
use serde_json::{Value, json};

use crate::common::tools::{prometheus_bin, rabbitmq_prometheus, repo};
use crate::common::{Backend, TestDb, TestServer, eventually, mobile, rfc3339_in};
use crate::deploy::{alert_rules, dashboard_queries, yaml};
use crate::smpp::{server as smpp_server, smsc, start_batch};

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

/// Debian's `prometheus`, run on a free loopback port with a configuration folder of the test's
/// own, stopped and removed when dropped.
struct Prometheus {
    child: std::process::Child,
    url: String,
    dir: PathBuf,
    agent: ureq::Agent,
}

impl Prometheus {
    /// Starts `prometheus` on `dir/prometheus.yml`, its data in `dir/data`; returns once ready.
    fn start(dir: PathBuf) -> Self {
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(prometheus_bin().join("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
            agent,
        };
        eventually("prometheus ready", SHORT, || {
            match prometheus
                .agent
                .get(format!("{}/-/ready", prometheus.url))
                .call()
            {
                Ok(r) if r.status() == 200 => Ok(()),
                other => Err(format!("{other:?}\n{}", prometheus.log())),
            }
        });
        prometheus
    }

    /// What Prometheus wrote on stderr.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>` with `query`; the answer's `data`, after checking its status.
    fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let mut request = self.agent.get(format!("{}/api/v1/{path}", self.url));
        for (k, v) in query {
            request = request.query(*k, *v);
        }
        let mut response = request.call().unwrap();
        let body: Value =
            serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
        assert_eq!(body["status"], "success", "{path} {query:?}: {body:#}");
        body["data"].clone()
    }

    /// The instant vector `expr` evaluates to now.
    fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("query", &[("query", expr)]);
        assert_eq!(data["resultType"], "vector", "{expr}: {data:#}");
        data["result"].as_array().unwrap().clone()
    }

    /// The alerts that are pending or firing.
    fn alerts(&self) -> Vec<Value> {
        self.api("alerts", &[])["alerts"]
            .as_array()
            .unwrap()
            .clone()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prometheus log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `deploy/prometheus` copied into a fresh folder with the compose stack's addresses replaced
/// by `targets` (compose address, local address) and the intervals shortened; nothing else
/// changes.
fn prometheus_folder(targets: &[(&str, String)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("smsbatch-prometheus-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let shipped = repo().join("deploy/prometheus");
    let mut config = std::fs::read_to_string(shipped.join("prometheus.yml")).unwrap();
    let intervals = [
        (
            "  scrape_interval: 15s\n",
            "  scrape_interval: 2s\n  scrape_timeout: 2s\n",
        ),
        (
            "  evaluation_interval: 15s\n",
            "  evaluation_interval: 1s\n",
        ),
    ];
    for (from, to) in intervals
        .iter()
        .map(|(f, t)| (*f, (*t).to_owned()))
        .chain(targets.iter().map(|(f, t)| (*f, t.clone())))
    {
        assert!(config.contains(from), "prometheus.yml has {from:?}");
        config = config.replace(from, &to);
    }
    std::fs::write(dir.join("prometheus.yml"), &config).unwrap();
    let rewritten = yaml(&dir.join("prometheus.yml"));
    for job in rewritten["scrape_configs"].as_vec().unwrap() {
        for target in job["static_configs"][0]["targets"].as_vec().unwrap() {
            let target = target.as_str().unwrap();
            assert!(
                target.starts_with("127.0.0.1:"),
                "{target} is left to rewrite"
            );
        }
    }
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "prometheus.yml" {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    dir
}

/// A port nothing listens on at the moment.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The host and port of a test server's base URL.
fn address(server: &TestServer) -> String {
    server.base_url().trim_start_matches("http://").to_owned()
}

/// Whether a query's answer holds a number (not NaN, which a ratio or percentile over nothing
/// gives).
fn has_number(result: &[Value]) -> bool {
    result.iter().any(|sample| {
        let value = sample["value"][1].as_str().unwrap_or("NaN");
        value.parse::<f64>().is_ok_and(f64::is_finite)
    })
}

/// The production topology of docker-compose.yml, natively: two instances on one PostgreSQL
/// database and the local RabbitMQ with its Prometheus plugin, an SMSC that sends receipts,
/// and Debian's Prometheus on the shipped configuration and alert rules. Once a batch is
/// delivered and its receipts are in, every target is up, every dashboard query returns a
/// number and every series an alert reads exists; a batch over its failure threshold fires
/// its alert, and an SMPP account whose SMSC is unreachable makes the two session alerts
/// pending for that account only; nothing else alerts.
#[test]
fn the_stack_is_monitored() {
    let broker_metrics = rabbitmq_prometheus();
    let smsc =
        smsc(json!({"receipts": "text", "receipt_delay_ms": 200, "undeliv_prefix": "8613900"}));
    let dead_port = free_port().to_string();
    let dead = [
        ("HOST", "127.0.0.1"),
        ("PORT", dead_port.as_str()),
        ("SYSTEM_ID", "esme"),
        ("PASSWORD", "s3cret"),
        ("SOURCE_ADDR", "Shop"),
    ];
    let mut env: Vec<(String, String)> = dead
        .iter()
        .map(|(k, v)| {
            (
                format!("SMSBATCH__PROVIDERS__SMPP__DEAD__{k}"),
                (*v).to_owned(),
            )
        })
        .collect();
    env.push(("SMSBATCH__SMSBATCH__FAILURE_WINDOW".into(), "20".into()));
    env.push((
        "SMSBATCH__PROVIDERS__SIMULATOR__RATE_LIMIT".into(),
        "200".into(),
    ));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let db = TestDb::new(Backend::PostgresRabbitmq);
    let a = smpp_server(&db, &smsc, &[], &env);
    let b = smpp_server(&db, &smsc, &[], &env);
    let broker = broker_metrics
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    let prometheus = Prometheus::start(prometheus_folder(&[
        ("smsbatch-a:8080", address(&a)),
        ("smsbatch-b:8080", address(&b)),
        ("rabbitmq:15692", broker),
    ]));

    // Every target scraped before anything is sent, as on a stack that has been running.
    let targets = eventually("every target up", SHORT, || {
        let targets = prometheus.api("targets", &[])["activeTargets"].clone();
        let targets = targets.as_array().unwrap();
        let down: Vec<&Value> = targets.iter().filter(|t| t["health"] != "up").collect();
        if targets.len() == 4 && down.is_empty() {
            Ok(targets.len())
        } else {
            Err(format!("{} targets, not up: {down:#?}", targets.len()))
        }
    });
    assert_eq!(targets, 4, "both instances, the broker and its queues");

    // One batch through the SMSC, every receipt in: 25 delivered, 5 undeliverable.
    let mut phones: Vec<String> = (0..25).map(|i| mobile(9_100 + i)).collect();
    phones.extend((0..5).map(|i| format!("+8613900{i:05}0")));
    let id = start_batch(&a, "Your code is 1234.", &phones);
    a.wait_for_state(&id, &["completed"], SHORT);
    eventually("every receipt in", SHORT, || {
        let results = a.batch(&id)["results"].clone();
        if (&results["delivered"], &results["failed"]) == (&json!(25), &json!(5)) {
            Ok(())
        } else {
            Err(format!("{results:#}"))
        }
    });

    let queries = dashboard_queries();
    let deadline = Duration::from_secs(60);
    eventually(
        "every dashboard query answered with a number",
        deadline,
        || {
            let empty: Vec<String> = queries
                .iter()
                .filter(|q| !has_number(&prometheus.query(&q.promql())))
                .map(|q| format!("{}: {}", q.panel, q.promql()))
                .collect();
            if empty.is_empty() {
                Ok(())
            } else {
                Err(format!("{empty:#?}"))
            }
        },
    );

    // Every alert rule evaluates, and every series it reads exists.
    let selector = Regex::new(r#"\b((?:smsbatch|rabbitmq)_[a-z_]+|up)\b(\{[^}]*\})?"#).unwrap();
    let rules = prometheus.api("rules", &[("type", "alert")]);
    let rules: Vec<Value> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect();
    assert_eq!(
        rules.len(),
        alert_rules().len(),
        "every rule of alerts.yml is loaded"
    );
    for rule in &rules {
        let (name, expr) = (&rule["name"], rule["query"].as_str().unwrap());
        let selectors: Vec<&str> = selector.find_iter(expr).map(|m| m.as_str()).collect();
        assert!(!selectors.is_empty(), "{name}: no selector found in {expr}");
        for selector in selectors {
            assert!(
                !prometheus.query(selector).is_empty(),
                "{name}: no series {selector}"
            );
        }
        assert_eq!(rule["health"], "ok", "{name}: {rule:#}");
    }

    // A batch over its failure threshold, started through the other instance.
    let failing = start_failing_batch(&b, 10, 2_000);
    b.wait_until(&failing, "paused by itself", SHORT, |batch| {
        batch["state"] == "paused"
    });
    let alerts = eventually("the alerts up", SHORT, || {
        let alerts = prometheus.alerts();
        let active: BTreeSet<(String, String, String)> = alerts
            .iter()
            .map(|a| {
                let label = |k: &str| a["labels"][k].as_str().unwrap_or_default().to_owned();
                (label("alertname"), label("provider"), label("instance"))
            })
            .collect();
        // Counted by whichever instance supervised the batch.
        let instances = [address(&a), address(&b)];
        let paused = active
            .iter()
            .any(|(n, _, i)| n == "SmsbatchBatchPausedByFailureThreshold" && instances.contains(i));
        let smpp = |alert: &str, server: &TestServer| {
            active.contains(&(alert.into(), "dead".into(), address(server)))
        };
        if paused
            && [&a, &b].iter().all(|s| {
                smpp("SmsbatchSmppSessionDown", s) && smpp("SmsbatchSmppAccountUnreachable", s)
            })
        {
            Ok(alerts)
        } else {
            Err(format!("{active:#?}"))
        }
    });
    let paused = alerts
        .iter()
        .find(|a| a["labels"]["alertname"] == "SmsbatchBatchPausedByFailureThreshold")
        .unwrap();
    assert_eq!(paused["state"], "firing", "it fires at once: {paused:#}");
    for alert in &alerts {
        let name = alert["labels"]["alertname"].as_str().unwrap();
        assert!(
            name == "SmsbatchBatchPausedByFailureThreshold"
                || (name.starts_with("SmsbatchSmpp") && alert["labels"]["provider"] == "dead"),
            "nothing else alerts on a healthy stack: {alert:#}"
        );
    }
}
