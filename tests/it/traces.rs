//! Traces over OTLP: two instances on one database and the local RabbitMQ export their spans to
//! a receiver the test runs; a batch started by a request that carries a `traceparent` is traced
//! from that request through its steps to every delivery task, across the broker and across
//! the instances. Without an endpoint, nothing about traces is even read.

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::json;

use crate::common::otlp::{Receiver, Span};
use crate::common::{Backend, TestDb, TestServer, eventually, mobile};

const DEADLINE: Duration = Duration::from_secs(120);
/// The caller's span, parent of the request's.
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn traced_server(db: &TestDb, receiver: &Receiver, instance: &str) -> TestServer {
    let endpoint = receiver.endpoint();
    let resource = format!("service.instance.id={instance}");
    TestServer::start(
        db,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_RESOURCE_ATTRIBUTES", resource.as_str()),
            // Nothing is exported on the processor's schedule during the test: what arrives is
            // what the stop flushed.
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
            // Many small tasks, so that both instances consume some of them.
            ("SMSBATCH__SMSBATCH__TASK_SIZE", "4"),
            ("SMSBATCH__PROVIDERS__SIMULATOR__LATENCY_MS", "20"),
        ],
    )
}

/// Creates a batch of `n` recipients on `server` and starts it with a request that carries a
/// `traceparent` of a new trace; answers the batch's id and the trace id.
fn start_traced_batch(server: &TestServer, n: u64) -> (String, String) {
    let recipients: Vec<_> = (0..n)
        .map(|i| json!({"phone": mobile(7_000 + i), "vars": {"name": format!("C{i}")}}))
        .collect();
    let id = server.create_batch(&json!({
        "name": "traced",
        "content": "Hi {{name}}",
        "message_type": "marketing",
        "partition_count": 2,
        "recipients": recipients,
    }));
    let trace_id = uuid::Uuid::now_v7().simple().to_string();
    let traceparent = format!("00-{trace_id}-{CALLER_SPAN}-01");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let started = agent
        .post(format!("{}/v1/batches/{id}/start", server.base_url()))
        .header("traceparent", &traceparent)
        .send_empty()
        .expect("POST start");
    assert_eq!(started.status(), 202);
    (id, trace_id)
}

/// Checks what every traced batch shows — the service's spans only, all as JSON; the start
/// request's span continuing the caller's; one span per step run under it, naming the batch —
/// and answers the request's span and the steps' spans by name.
fn request_and_steps<'a>(
    receiver: &Receiver,
    spans: &'a [Span],
    id: &str,
    trace_id: &str,
) -> (&'a Span, HashMap<&'static str, Vec<&'a Span>>) {
    assert!(
        receiver.unexpected().is_empty(),
        "{:?}",
        receiver.unexpected()
    );
    assert!(
        spans
            .iter()
            .all(|s| s.resource.get("service.name").map(String::as_str) == Some("smsbatch")),
        "every span is the service's: {:?}",
        spans
            .iter()
            .map(|s| s.resource.get("service.name"))
            .collect::<HashSet<_>>()
    );
    let traced: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let requests: Vec<&Span> = traced
        .iter()
        .copied()
        .filter(|s| s.parent_span_id == CALLER_SPAN)
        .collect();
    assert_eq!(
        requests.len(),
        1,
        "one span continues the caller's: {traced:#?}"
    );
    let request = requests[0];
    assert_eq!(request.name, "POST /v1/batches/{id}/start");
    assert_eq!(request.kind, 2, "a server span");
    assert_eq!(request.attribute("http.status_code"), Some("202"));
    assert_eq!(
        request.attribute("trace_id"),
        Some(trace_id),
        "for the logs"
    );
    // Its steps, one span each (a step restarted would have more, all the request's).
    let mut steps = HashMap::new();
    for step in ["preparation", "delivery"] {
        let runs: Vec<&Span> = traced.iter().copied().filter(|s| s.name == step).collect();
        assert!(!runs.is_empty(), "a {step} span in the request's trace");
        for run in &runs {
            assert_eq!(run.parent_span_id, request.span_id, "{step}: {run:#?}");
            assert_eq!(run.attribute("batch_id"), Some(id), "{run:#?}");
        }
        steps.insert(step, runs);
    }
    (request, steps)
}

fn by_instance<'a>(spans: &'a [Span], instance: &str) -> impl Iterator<Item = &'a Span> {
    spans.iter().filter(move |s| {
        s.resource.get("service.instance.id").map(String::as_str) == Some(instance)
    })
}

/// A batch started on instance `a` with a `traceparent`: the request's span continues the
/// caller's trace, the preparation and delivery steps are its children, each task published
/// has a `publish` span under the delivery step, and each task's span (on whichever instance
/// consumed it) is the child of its publish span; instance `b` carries out tasks that `a`
/// published. The spans arrive when the instances stop (SIGTERM flushes them).
#[test]
fn a_batch_is_traced_from_its_request_to_every_task_across_the_broker() {
    let receiver = Receiver::start();
    let db = TestDb::new(Backend::PostgresRabbitmq);
    let mut a = traced_server(&db, &receiver, "a");
    let mut b = traced_server(&db, &receiver, "b");
    for server in [&a, &b] {
        eventually("both instances ready", DEADLINE, || {
            let reply = server.get("/readyz");
            (reply.status == 200).then_some(()).ok_or(reply.body)
        });
    }

    let (id, trace_id) = start_traced_batch(&a, 120);
    let done = a.wait_for_state(&id, &["completed"], DEADLINE);
    assert_eq!(done["results"]["sent"], 120, "{done:#}");

    for server in [&mut a, &mut b] {
        let (code, _) = server.terminate();
        assert_eq!(code, Some(0), "{}", server.output_tail());
    }
    let spans = receiver.spans();
    let (request, steps) = request_and_steps(&receiver, &spans, &id, &trace_id);
    assert_eq!(request.resource["service.instance.id"], "a");
    let named = |name: &str| -> Vec<&Span> {
        spans
            .iter()
            .filter(|s| s.trace_id == trace_id && s.name == name)
            .collect()
    };
    let deliveries: HashSet<&str> = steps["delivery"]
        .iter()
        .map(|s| s.span_id.as_str())
        .collect();

    // Every task published under the delivery step, every task span under its publish span.
    let publishes = named("publish");
    assert!(
        publishes.len() >= 120 / 4,
        "a publish per task: {}",
        publishes.len()
    );
    for publish in &publishes {
        assert!(
            deliveries.contains(publish.parent_span_id.as_str()),
            "{publish:#?}"
        );
        assert_eq!(publish.kind, 4, "a producer span: {publish:#?}");
        assert_eq!(publish.attribute("messaging.system"), Some("rabbitmq"));
    }
    let published: HashMap<&str, &Span> =
        publishes.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    let tasks = named("task");
    for task in &tasks {
        let publish = published
            .get(task.parent_span_id.as_str())
            .unwrap_or_else(|| panic!("a task span's parent is a publish span: {task:#?}"));
        assert_eq!(task.attribute("first_id"), publish.attribute("first_id"));
        assert_eq!(task.attribute("partition"), publish.attribute("partition"));
    }
    let carried: HashSet<&str> = tasks.iter().map(|t| t.parent_span_id.as_str()).collect();
    assert_eq!(
        carried.len(),
        publishes.len(),
        "every published task was carried out under its publish span"
    );
    let across = by_instance(&spans, "b")
        .filter(|t| t.name == "task" && t.trace_id == trace_id)
        .filter(|t| published[t.parent_span_id.as_str()].resource["service.instance.id"] == "a")
        .count();
    assert!(
        across > 0,
        "instance b carried out tasks that a published, under a's publish spans: {} tasks on a, {} on b",
        by_instance(&spans, "a")
            .filter(|t| t.name == "task")
            .count(),
        by_instance(&spans, "b")
            .filter(|t| t.name == "task")
            .count(),
    );
}

/// In-process (SQLite, one instance), each task's span is the child of the delivery step that
/// dispatched it, in the start request's trace.
#[test]
fn in_process_a_task_is_a_child_of_its_delivery_step() {
    let receiver = Receiver::start();
    let db = TestDb::new(Backend::Sqlite);
    let mut server = traced_server(&db, &receiver, "solo");
    let (id, trace_id) = start_traced_batch(&server, 40);
    server.wait_for_state(&id, &["completed"], DEADLINE);
    let (code, _) = server.terminate();
    assert_eq!(code, Some(0), "{}", server.output_tail());
    let spans = receiver.spans();
    let (_, steps) = request_and_steps(&receiver, &spans, &id, &trace_id);
    let deliveries: HashSet<&str> = steps["delivery"]
        .iter()
        .map(|s| s.span_id.as_str())
        .collect();
    let tasks: Vec<&Span> = spans.iter().filter(|s| s.name == "task").collect();
    assert!(tasks.len() >= 40 / 4, "a span per task: {}", tasks.len());
    for task in tasks {
        assert_eq!(task.trace_id, trace_id, "{task:#?}");
        assert!(
            deliveries.contains(task.parent_span_id.as_str()),
            "{task:#?}"
        );
    }
    assert!(
        spans.iter().all(|s| s.name != "publish"),
        "no broker, no publish span"
    );
}

/// A collector that takes the connection and never answers holds nothing up: the batch is
/// delivered while the exporter waits for it, and the stop waits for it no longer than the
/// exit's flush bound (5 s), not the exporter's own timeout (60 s here).
#[test]
fn a_collector_that_never_answers_holds_nothing_up() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    let held = Arc::new(Mutex::new(Vec::new()));
    let holding = Arc::clone(&held);
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            holding
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(stream);
        }
    });
    let db = TestDb::new(Backend::Sqlite);
    let mut server = TestServer::start(
        &db,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "60000"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("SMSBATCH__SMSBATCH__TASK_SIZE", "4"),
        ],
    );
    let (id, _) = start_traced_batch(&server, 80);
    eventually("the exporter connected", DEADLINE, || {
        let n = held.lock().unwrap_or_else(|p| p.into_inner()).len();
        (n > 0).then_some(()).ok_or("no connection yet".to_owned())
    });
    let done = server.wait_for_state(&id, &["completed"], DEADLINE);
    assert_eq!(done["results"]["sent"], 80, "{done:#}");
    assert_eq!(server.get("/healthz").status, 200);
    let (code, took) = server.terminate();
    assert_eq!(code, Some(0), "{}", server.output_tail());
    assert!(
        took < Duration::from_secs(20),
        "the stop took {took:?}: {}",
        server.output_tail()
    );
    let output = server.output_tail();
    assert!(
        output.contains("Spans not exported at exit."),
        "the operator is told: {output}"
    );
}

/// Without an endpoint, the `OTEL_*` variables are not read at all: a sampler this service
/// refuses does not stop start-up, and the service serves. With an endpoint, the same variable
/// stops start-up (exit 2) with a message naming it.
#[test]
fn without_an_endpoint_traces_are_off_and_start_up_is_unchanged() {
    let bad_sampler = [("OTEL_TRACES_SAMPLER", "sometimes")];
    let db = TestDb::new(Backend::Sqlite);
    let mut server = TestServer::start(
        &db,
        &[
            bad_sampler[0],
            ("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""),
            ("SMSBATCH__LOG__LEVEL", "info"),
        ],
    );
    assert_eq!(server.get("/healthz").status, 200);
    let (code, _) = server.terminate();
    assert_eq!(code, Some(0));
    let output = server.output_tail();
    assert!(!output.contains("OTLP"), "no word of traces: {output}");

    let receiver = Receiver::start();
    let out = Command::new(env!("CARGO_BIN_EXE_smsbatch"))
        .arg("serve")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .env(bad_sampler[0].0, bad_sampler[0].1)
        .output()
        .expect("run smsbatch");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("OTEL_TRACES_SAMPLER"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());
}
