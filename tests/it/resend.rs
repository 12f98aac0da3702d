//! Resending what failed against the real server (docs/api.md, "Resending what failed"): an
//! ended batch with exactly 100 failed messages, resent, makes a batch of exactly those 100
//! numbers, each with its own vars (the gateway receives the same text again), with the
//! original's settings and `parent_id`; a batch not yet final is 409, a resend that matches
//! nothing 422, bad statuses 400 or 422 with the API's error body, and none of the refusals
//! stores a batch. On both stores, through an `http` gateway that the test runs.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::sink::Sink;
use crate::common::{Backend, TestDb, TestServer, assert_error, mobile, num, text};

const DEADLINE: Duration = Duration::from_secs(180);
const CONTENT: &str = "Hi {{name}}, your code is {{code}}";

on_both_backends!(resending_the_failed_makes_a_batch_of_exactly_them
    => resending_the_failed_makes_a_batch_of_exactly_them_sqlite,
       resending_the_failed_makes_a_batch_of_exactly_them_postgres);

/// Every batch id on the server.
fn batch_ids(server: &TestServer) -> Vec<String> {
    let (status, page) = server.get_json("/v1/batches?limit=500");
    assert_eq!(status, 200, "{page}");
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| text(b, "/id").to_owned())
        .collect()
}

/// What the gateway received for each number (the last text sent to it), of the numbers in
/// `phones`.
fn texts_received(sink: &Sink, phones: &[String]) -> BTreeMap<String, String> {
    sink.received()
        .into_iter()
        .filter(|r| phones.contains(&r.to))
        .map(|r| (r.to, r.body))
        .collect()
}

fn resending_the_failed_makes_a_batch_of_exactly_them(backend: Backend) {
    let sink = Sink::start();
    sink.refuse_ending(&["0001"], 400);
    let db = TestDb::new(backend);
    let url = sink.url();
    let server = TestServer::start(
        &db,
        &[("SMSBATCH__PROVIDERS__HTTP__SINK__URL", url.as_str())],
    );

    // 400 recipients, each with its own vars; every fourth number ends 0001 and the gateway
    // refuses it for good: exactly 100 fail. Two rows that are no numbers get no message.
    let id = server.create_batch(&json!({
        "name": "codes", "content": CONTENT, "provider": "sink", "message_type": "marketing",
        "partition_count": 3, "failure_threshold": 1, "campaign_id": "cmp-7",
    }));
    let mut csv = String::from("phone,name,code\n");
    let mut failing = Vec::new();
    for i in 0..400u64 {
        let last = if i % 4 == 0 { 1 } else { 9 };
        let phone = mobile(i * 10_000 + last);
        if last == 1 {
            failing.push(phone.clone());
        }
        // Names of different lengths (and a comma), so that each text is its own.
        let _ = writeln!(csv, "{phone},\"Ann, {}\",C{i}", "x".repeat(i as usize % 7));
    }
    csv.push_str("12345,Nobody,C-1\nnot a number,Nobody,C-2\n");
    assert_eq!(server.upload_csv(&id, csv).0, 200);
    failing.sort();

    // Not final yet: 409, and nothing stored.
    let resend = format!("/v1/batches/{id}/resend");
    assert_error(
        &server.post_json(&resend, &json!({"statuses": ["failed"]})),
        409,
        "invalid_transition",
        "resend of an initial batch",
    );
    server.action_ok(&id, "start", "preparing");
    let original = server.wait_for_state(&id, &["completed"], DEADLINE);
    assert_eq!(num(&original, "/results/failed"), 100, "{original:#}");
    assert_eq!(num(&original, "/results/sent"), 300, "{original:#}");
    let sent_first = texts_received(&sink, &failing);
    assert_eq!(sent_first.len(), 100);

    // Refusals, each with the error body, none storing a batch.
    for (body, status, code) in [
        (json!({"statuses": ["cancelled"]}), 422, "invalid"),
        (json!({"statuses": []}), 422, "invalid"),
        (json!({"statuses": ["delivered"]}), 422, "invalid"),
        (json!({"statuses": ["pending", "failed"]}), 422, "invalid"),
        (json!({"statuses": ["spam"]}), 400, "bad_request"),
        (json!({"statuses": "failed"}), 400, "bad_request"),
        (json!({"name": "no statuses"}), 400, "bad_request"),
        (
            json!({"statuses": ["failed"], "name": "  "}),
            422,
            "invalid",
        ),
        (
            json!({"statuses": ["failed"], "name": "n".repeat(201)}),
            422,
            "invalid",
        ),
    ] {
        assert_error(
            &server.post_json(&resend, &body),
            status,
            code,
            &format!("resend {body}"),
        );
    }
    let unknown = format!("/v1/batches/{}/resend", uuid::Uuid::now_v7());
    assert_error(
        &server.post_json(&unknown, &json!({"statuses": ["failed"]})),
        404,
        "not_found",
        "resend of an unknown batch",
    );
    assert_eq!(
        batch_ids(&server),
        std::slice::from_ref(&id),
        "the refusals stored nothing"
    );

    // The resend: a new batch of exactly the 100, with the original's settings.
    let (status, copy) = server.post_json(&resend, &json!({"statuses": ["failed"]}));
    assert_eq!(status, 201, "{copy:#}");
    let copy_id = text(&copy, "/id").to_owned();
    assert_ne!(copy_id, id);
    assert_eq!(copy["state"], "initial");
    assert_eq!(copy["parent_id"], Value::String(id.clone()));
    assert_eq!(copy["name"], "codes (resent)");
    assert_eq!(num(&copy, "/results/recipients"), 100);
    for field in [
        "content",
        "provider",
        "message_type",
        "partition_count",
        "failure_threshold",
        "campaign_id",
        "url",
    ] {
        assert_eq!(copy[field], original[field], "{field}");
    }
    assert_eq!(original["parent_id"], Value::Null);
    assert_eq!(
        server.batch(&copy_id)["parent_id"],
        Value::String(id.clone())
    );

    // Sent, it reaches exactly those numbers with exactly the texts they got the first time.
    server.action_ok(&copy_id, "start", "preparing");
    let done = server.wait_for_state(&copy_id, &["completed"], DEADLINE);
    assert_eq!(num(&done, "/results/valid"), 100, "{done:#}");
    assert_eq!(
        num(&done, "/results/invalid"),
        0,
        "every recipient has its vars"
    );
    let mut phones: Vec<String> = server
        .all_messages(&copy_id, None)
        .iter()
        .map(|m| text(m, "/phone").to_owned())
        .collect();
    phones.sort();
    assert_eq!(phones, failing);
    let copy_requests = sink
        .received()
        .into_iter()
        .filter(|r| failing.contains(&r.to))
        .count();
    assert_eq!(
        copy_requests, 200,
        "each failing number got one request per batch"
    );
    assert_eq!(texts_received(&sink, &failing), sent_first);

    // A name given is kept; `sent` (no receipt) resends the 300 others.
    let (status, again) = server.post_json(
        &resend,
        &json!({"statuses": ["sent", "sent"], "name": "the others"}),
    );
    assert_eq!(status, 201, "{again:#}");
    assert_eq!(again["name"], "the others");
    assert_eq!(num(&again, "/results/recipients"), 300);
    assert_eq!(batch_ids(&server).len(), 3);
}
