//! HTTP integration tests: the real `smsbatch` binary on port 0, one fresh database per test,
//! every scenario on both SQLite and PostgreSQL. Each asserts what an operator would check
//! through the API (states, exact counts, message listings, error bodies), per
//! `/work/shared/API.md`.
//!
//! Expected counts are derived from the recipient lists the tests generate: valid numbers are
//! written either as `+86138XXXXXXXX` or in national format `138 XXXX XXXX`, invalid ones are
//! strings no phone parser accepts as a valid CN number, and the simulator fails numbers ending
//! `0001` permanently and those ending `0002` once.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{
    ACTIONS, Backend, TestDb, TestServer, assert_error, assert_error_message, canonical,
    eventually, mobile, national, num, rfc3339_in, text,
};

/// A deadline for small batches (only stops a stuck test).
const SHORT: Duration = Duration::from_secs(120);
/// A deadline for the large batches on a loaded two-core machine (only stops a stuck test).
const LONG: Duration = Duration::from_secs(600);

const CONTENT: &str = "Hi {{name}}, 30% off today: {{url}}";
const URL: &str = "https://shop.example/bf";

on_both_backends!(completes_inline_batch_with_exact_counts
    => completes_inline_batch_with_exact_counts_sqlite,
       completes_inline_batch_with_exact_counts_postgres,
       completes_inline_batch_with_exact_counts_rabbitmq);
on_both_backends!(csv_upload_pause_resume_completes_exactly_once
    => csv_upload_pause_resume_completes_exactly_once_sqlite,
       csv_upload_pause_resume_completes_exactly_once_postgres,
       csv_upload_pause_resume_completes_exactly_once_rabbitmq);
on_both_backends!(a_stranded_claim_is_settled_and_the_batch_completes
    => a_stranded_claim_is_settled_and_the_batch_completes_sqlite,
       a_stranded_claim_is_settled_and_the_batch_completes_postgres,
       a_stranded_claim_is_settled_and_the_batch_completes_rabbitmq);
on_both_backends!(cancel_mid_delivery_cancels_the_rest
    => cancel_mid_delivery_cancels_the_rest_sqlite,
       cancel_mid_delivery_cancels_the_rest_postgres,
       cancel_mid_delivery_cancels_the_rest_rabbitmq);
on_both_backends!(failing_step_fails_the_batch_and_retry_resumes_it
    => failing_step_fails_the_batch_and_retry_resumes_it_sqlite,
       failing_step_fails_the_batch_and_retry_resumes_it_postgres);
on_both_backends!(a_corrupt_state_is_an_internal_error
    => a_corrupt_state_is_an_internal_error_sqlite,
       a_corrupt_state_is_an_internal_error_postgres);
on_both_backends!(counts_that_do_not_add_up_fail_the_batch
    => counts_that_do_not_add_up_fail_the_batch_sqlite,
       counts_that_do_not_add_up_fail_the_batch_postgres);
on_both_backends!(sigterm_drains_and_restart_finishes_exactly
    => sigterm_drains_and_restart_finishes_exactly_sqlite,
       sigterm_drains_and_restart_finishes_exactly_postgres,
       sigterm_drains_and_restart_finishes_exactly_rabbitmq);
on_both_backends!(illegal_transitions_and_unknown_ids
    => illegal_transitions_and_unknown_ids_sqlite,
       illegal_transitions_and_unknown_ids_postgres,
       illegal_transitions_and_unknown_ids_rabbitmq);
on_both_backends!(csv_without_phone_column_stores_nothing
    => csv_without_phone_column_stores_nothing_sqlite,
       csv_without_phone_column_stores_nothing_postgres);
on_both_backends!(restart_mid_delivery_finishes_with_exact_counts
    => restart_mid_delivery_finishes_with_exact_counts_sqlite,
       restart_mid_delivery_finishes_with_exact_counts_postgres,
       restart_mid_delivery_finishes_with_exact_counts_rabbitmq);
on_both_backends!(scheduled_batch_starts_when_due
    => scheduled_batch_starts_when_due_sqlite,
       scheduled_batch_starts_when_due_postgres,
       scheduled_batch_starts_when_due_rabbitmq);
on_both_backends!(restart_mid_preparation_prepares_each_recipient_once
    => restart_mid_preparation_prepares_each_recipient_once_sqlite,
       restart_mid_preparation_prepares_each_recipient_once_postgres);
on_both_backends!(too_many_failures_pause_the_batch
    => too_many_failures_pause_the_batch_sqlite, too_many_failures_pause_the_batch_postgres);
on_both_backends!(probes_and_metrics
    => probes_and_metrics_sqlite,
       probes_and_metrics_postgres,
       probes_and_metrics_rabbitmq);

// ---------------------------------------------------------------------------------------------
// Recipient lists and the counts they must produce
// ---------------------------------------------------------------------------------------------

/// What preparation and delivery must count for a recipient list.
#[derive(Debug)]
struct Expected {
    recipients: u64,
    valid: u64,
    invalid: u64,
    duplicates: u64,
    /// E.164 of every distinct valid number: exactly one message each.
    valid_phones: BTreeSet<String>,
    /// Valid numbers ending `0001`: the simulator fails them permanently.
    permanent: BTreeSet<String>,
    /// Valid numbers ending `0002`: the simulator fails their first attempt only.
    transient: BTreeSet<String>,
}

impl Expected {
    fn of(phones: &[String]) -> Self {
        let mut valid_phones = BTreeSet::new();
        let (mut invalid, mut duplicates) = (0, 0);
        for phone in phones {
            match canonical(phone) {
                None => invalid += 1,
                Some(e164) => {
                    if !valid_phones.insert(e164) {
                        duplicates += 1;
                    }
                }
            }
        }
        let ending = |suffix: &str| -> BTreeSet<String> {
            valid_phones
                .iter()
                .filter(|p| p.ends_with(suffix))
                .cloned()
                .collect()
        };
        Self {
            recipients: phones.len() as u64,
            valid: valid_phones.len() as u64,
            invalid,
            duplicates,
            permanent: ending("0001"),
            transient: ending("0002"),
            valid_phones,
        }
    }

    fn failed(&self) -> u64 {
        self.permanent.len() as u64
    }

    fn sent(&self) -> u64 {
        self.valid - self.failed()
    }
}

/// A deterministic Fisher–Yates shuffle (xorshift64), so the mix is interleaved but repeatable.
fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let j = (seed % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// 1,000 inline recipients: 10 permanent failures, 10 transient ones, 12 invalid numbers,
/// 20 exact duplicates and one duplicate written in national format.
fn inline_phones() -> Vec<String> {
    let mut phones: Vec<String> = Vec::with_capacity(1000);
    phones.extend((0..10).map(|k| mobile(20_000_001 + k * 10_000)));
    phones.extend((0..10).map(|k| mobile(30_000_002 + k * 10_000)));
    phones.extend(["12345", "not-a-phone", "+86123", ""].map(String::from));
    phones.extend((0..8).map(|k| format!("bad-{k}")));
    phones.push("+8613800001234".into());
    phones.push("138 0000 1234".into());
    let regular: Vec<String> = (0..946).map(|k| mobile(40_000_007 + k * 10)).collect();
    phones.extend((0..20).map(|k| regular[k * 37].clone()));
    phones.extend(regular);
    shuffle(&mut phones, 0x5eed_cafe_f00d_d00d);
    assert_eq!(phones.len(), 1000);
    phones
}

/// `rows` CSV recipients: mostly distinct valid numbers (those at rows ≡ 1 and 2 mod 10,000 end
/// in `0001` and `0002`), the four documented invalid examples, one `bad-…` row in 331, one
/// exact duplicate in 257 and one national-format duplicate in 4,999.
fn csv_phones(rows: u64) -> Vec<String> {
    (0..rows)
        .map(|i| match i {
            7 => String::new(),
            8 => "not-a-phone".into(),
            9 => "12345".into(),
            10 => "+86123".into(),
            _ if i % 331 == 17 => format!("bad-{i}"),
            _ if i % 257 == 100 => mobile(10_000_000 + i - 50),
            _ if i % 4999 == 2000 => national(&mobile(10_000_000 + i - 1)),
            _ => mobile(10_000_000 + i),
        })
        .collect()
}

/// A `phone,name` CSV of `phones`.
fn csv_body(phones: &[String]) -> String {
    let mut csv = String::with_capacity(phones.len() * 32 + 16);
    csv.push_str("phone,name\n");
    for (i, phone) in phones.iter().enumerate() {
        let _ = writeln!(csv, "{phone},Customer {i}");
    }
    csv
}

// ---------------------------------------------------------------------------------------------
// Assertions shared by the scenarios
// ---------------------------------------------------------------------------------------------

/// `results.sent`.
fn sent(batch: &Value) -> u64 {
    num(batch, "/results/sent")
}

/// Whether delivery has sent something yet (tolerates results not filled in before delivery).
fn has_sent(batch: &Value) -> bool {
    batch
        .pointer("/results/sent")
        .and_then(Value::as_u64)
        .is_some_and(|n| n > 0)
}

/// Waits until `results.sent` reaches `n`.
fn wait_sent(server: &TestServer, id: &str, n: u64) {
    server.wait_until(id, &format!("results.sent >= {n}"), SHORT, |b| {
        b.pointer("/results/sent")
            .and_then(Value::as_u64)
            .is_some_and(|sent| sent >= n)
    });
}

/// The named `results` counts of a batch.
fn results<const N: usize>(batch: &Value, keys: [&'static str; N]) -> BTreeMap<&'static str, u64> {
    keys.into_iter()
        .map(|k| (k, num(batch, &format!("/results/{k}"))))
        .collect()
}

/// Messages with an outcome so far: sent, delivered or failed.
fn processed(batch: &Value) -> u64 {
    num(batch, "/results/sent") + num(batch, "/results/delivered") + num(batch, "/results/failed")
}

/// `recipients = valid + invalid + duplicates + opted_out`.
fn assert_recipient_rule(batch: &Value) {
    let r = |k: &str| num(batch, &format!("/results/{k}"));
    assert_eq!(
        r("recipients"),
        r("valid") + r("invalid") + r("duplicates") + r("opted_out"),
        "recipients = valid + invalid + duplicates + opted_out: {:#}",
        batch["results"]
    );
}

/// `valid = sent + delivered + failed + cancelled`.
fn assert_outcome_rule(batch: &Value) {
    let r = |k: &str| num(batch, &format!("/results/{k}"));
    assert_eq!(
        r("valid"),
        r("sent") + r("delivered") + r("failed") + r("cancelled"),
        "valid = sent + delivered + failed + cancelled: {:#}",
        batch["results"]
    );
}

/// The preparation counts (recipients, valid, invalid, duplicates, opted_out) are exact.
fn assert_prepared_counts(batch: &Value, expected: &Expected) {
    let actual = results(
        batch,
        ["recipients", "valid", "invalid", "duplicates", "opted_out"],
    );
    let wanted = BTreeMap::from([
        ("recipients", expected.recipients),
        ("valid", expected.valid),
        ("invalid", expected.invalid),
        ("duplicates", expected.duplicates),
        ("opted_out", 0),
    ]);
    assert_eq!(
        actual, wanted,
        "preparation counts of {:#}",
        batch["results"]
    );
    assert_recipient_rule(batch);
}

/// Every count of a batch that completed normally is exact, and both counting rules hold.
fn assert_completed_counts(batch: &Value, expected: &Expected) {
    assert_eq!(batch["state"], "completed", "{batch:#}");
    let prepared = batch["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Prepared"))
        .cloned()
        .unwrap_or_else(|| panic!("a Prepared condition: {batch:#}"));
    assert_eq!(
        prepared["message"],
        format!(
            "{} of {} recipients are valid ({} invalid, {} duplicates, 0 opted out)",
            expected.valid, expected.recipients, expected.invalid, expected.duplicates
        ),
        "the Prepared condition states the final counts"
    );
    assert_prepared_counts(batch, expected);
    let actual = results(batch, ["sent", "delivered", "failed", "cancelled"]);
    let wanted = BTreeMap::from([
        ("sent", expected.sent()),
        ("delivered", 0),
        ("failed", expected.failed()),
        ("cancelled", 0),
    ]);
    assert_eq!(actual, wanted, "delivery counts of {:#}", batch["results"]);
    assert_outcome_rule(batch);
}

/// Both steps `completed` at 100 %.
fn assert_steps_completed(batch: &Value) {
    for step in ["preparation", "delivery"] {
        assert_eq!(
            text(batch, &format!("/steps/{step}/status")),
            "completed",
            "step {step}: {:#}",
            batch["steps"]
        );
        let percentage = batch
            .pointer(&format!("/steps/{step}/progress/percentage"))
            .and_then(Value::as_f64);
        assert_eq!(
            percentage,
            Some(100.0),
            "step {step} progress: {:#}",
            batch["steps"]
        );
    }
}

/// Uploads a CSV and asserts `{"accepted": accepted, "total": total}`.
fn upload_ok(server: &TestServer, id: &str, csv: String, accepted: u64, total: u64) {
    let (status, body) = server.upload_csv(id, csv);
    assert_eq!(status, 200, "upload answered {status}: {body:#}");
    assert_eq!(
        (num(&body, "/accepted"), num(&body, "/total")),
        (accepted, total),
        "upload answer {body:#}"
    );
}

/// A small batch body with `n` valid recipients inline.
fn small_batch(name: &str, n: u64) -> Value {
    let recipients: Vec<Value> = (0..n)
        .map(|k| json!({"phone": mobile(60_000_005 + k * 10), "vars": {"name": format!("Guest {k}")}}))
        .collect();
    json!({"name": name, "content": CONTENT, "url": URL, "recipients": recipients})
}

/// Phone and status of every message, page by page.
fn message_statuses(server: &TestServer, id: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    server.for_each_message(id, None, |m| {
        out.push((
            text(m, "/phone").to_owned(),
            text(m, "/status").to_owned(),
            m["error"].as_str().unwrap_or("").to_owned(),
        ));
    });
    out
}

/// Every valid recipient has exactly one message: as many messages as valid recipients, and
/// their phones are exactly the distinct valid numbers.
fn assert_one_message_per_valid_recipient(
    messages: &[(String, String, String)],
    expected: &Expected,
) {
    assert_eq!(
        messages.len() as u64,
        expected.valid,
        "one message per valid recipient"
    );
    let phones: BTreeSet<&str> = messages.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(
        phones.len() as u64,
        expected.valid,
        "no valid recipient has two messages"
    );
    let missing: Vec<&String> = expected
        .valid_phones
        .iter()
        .filter(|p| !phones.contains(p.as_str()))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "valid recipients without a message: {missing:?}"
    );
}

fn status_counts(messages: &[(String, String, String)]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for (_, status, _) in messages {
        *counts.entry(status.clone()).or_insert(0) += 1;
    }
    counts
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

fn completes_inline_batch_with_exact_counts(backend: Backend) {
    let db = TestDb::new(backend);
    let server = TestServer::start(&db, &[]);

    let phones = inline_phones();
    let expected = Expected::of(&phones);
    assert_eq!(
        (
            expected.invalid,
            expected.duplicates,
            expected.failed(),
            expected.transient.len()
        ),
        (12, 21, 10, 10),
        "the generated mix"
    );
    let recipients: Vec<Value> = phones
        .iter()
        .enumerate()
        .map(|(i, phone)| json!({"phone": phone, "vars": {"name": format!("Customer {i}")}}))
        .collect();
    let id = server.create_batch(&json!({
        "name": "inline-exact",
        "campaign_id": "cmp-42",
        "content": CONTENT,
        "url": URL,
        "provider": "simulator",
        "message_type": "marketing",
        "partition_count": 4,
        "recipients": recipients,
    }));
    let created = server.batch(&id);
    assert_eq!(created["state"], "initial");
    assert_eq!(created["name"], "inline-exact");
    assert_eq!(created["partition_count"], 4);

    server.action_ok(&id, "start", "preparing");
    let batch = server.wait_for_state(&id, &["completed"], SHORT);

    assert_completed_counts(&batch, &expected);
    assert_steps_completed(&batch);

    let partitions = batch["partitions"]
        .as_array()
        .unwrap_or_else(|| panic!("partitions is an array: {batch:#}"));
    assert_eq!(partitions.len(), 4, "partition_count 4: {partitions:#?}");
    let partition_total: u64 = partitions.iter().map(|p| num(p, "/total")).sum();
    assert_eq!(
        partition_total, expected.valid,
        "partitions share the valid messages: {partitions:#?}"
    );

    for kind in ["Prepared", "Delivered"] {
        let condition = batch["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
            .unwrap_or_else(|| panic!("a {kind} condition: {:#}", batch["conditions"]));
        assert_eq!(condition["status"], "True", "{kind}: {condition:#}");
    }

    // Every valid recipient has one message, with the E.164 number and one segment.
    let messages = server.all_messages(&id, None);
    assert_eq!(
        messages.len() as u64,
        expected.valid,
        "one message per valid recipient"
    );
    let phones_seen: BTreeSet<String> = messages
        .iter()
        .map(|m| text(m, "/phone").to_owned())
        .collect();
    assert_eq!(
        phones_seen, expected.valid_phones,
        "message phones are E.164"
    );
    for m in &messages {
        assert_eq!(
            num(m, "/segments"),
            1,
            "a short GSM-7 text is one segment: {m:#}"
        );
    }

    // The permanent failures, and only they, are failed, each with its reason.
    let failed = server.all_messages(&id, Some("failed"));
    let failed_phones: BTreeSet<String> = failed
        .iter()
        .map(|m| text(m, "/phone").to_owned())
        .collect();
    assert_eq!(
        failed_phones, expected.permanent,
        "failed = the 0001 numbers"
    );
    for m in &failed {
        assert_eq!(m["status"], "failed", "{m:#}");
        assert!(
            m["error"].as_str().is_some_and(|e| !e.trim().is_empty()),
            "a failed message says why: {m:#}"
        );
        assert_eq!(
            num(m, "/attempts"),
            1,
            "a permanent error is not retried: {m:#}"
        );
    }

    // The transient failures were sent on their second attempt; everything else on its first.
    let sent_messages = server.all_messages(&id, Some("sent"));
    assert_eq!(sent_messages.len() as u64, expected.sent());
    for m in &sent_messages {
        assert_eq!(m["status"], "sent", "{m:#}");
        let phone = text(m, "/phone");
        let attempts = if expected.transient.contains(phone) {
            2
        } else {
            1
        };
        assert_eq!(num(m, "/attempts"), attempts, "attempts of {phone}: {m:#}");
    }
    for phone in &expected.transient {
        assert!(
            sent_messages.iter().any(|m| m["phone"] == phone.as_str()),
            "the transient failure {phone} was sent in the end"
        );
    }

    // Listing: newest first, one per page with limit=1, and the state filter.
    let other = server.create_batch(&json!({"name": "second", "content": "hello"}));
    let mut listed = Vec::new();
    let mut path = "/v1/batches?limit=1".to_owned();
    loop {
        let (status, page) = server.get_json(&path);
        assert_eq!(status, 200, "GET {path}: {page:#}");
        let items = page["items"]
            .as_array()
            .unwrap_or_else(|| panic!("GET {path}: items: {page:#}"));
        assert!(items.len() <= 1, "limit=1 gives at most one item: {page:#}");
        listed.extend(items.iter().map(|b| text(b, "/id").to_owned()));
        match page["next"].as_str() {
            Some(next) if listed.len() < 10 => {
                path = format!("/v1/batches?limit=1&after={}", crate::common::encode(next));
            }
            Some(_) => panic!("more pages than batches: {listed:?}"),
            None => break,
        }
    }
    assert_eq!(listed, vec![other.clone(), id.clone()], "newest first");
    let (status, completed) = server.get_json("/v1/batches?state=completed");
    assert_eq!(status, 200, "{completed:#}");
    let completed_ids: Vec<&str> = completed["items"]
        .as_array()
        .map(|items| items.iter().filter_map(|b| b["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        completed_ids,
        vec![id.as_str()],
        "state=completed: {completed:#}"
    );
}

fn csv_upload_pause_resume_completes_exactly_once(backend: Backend) {
    let db = TestDb::new(backend);
    let server = TestServer::start(
        &db,
        &[
            ("SMSBATCH__PROVIDERS__SIMULATOR__LATENCY_MS", "1"),
            ("SMSBATCH__SMSBATCH__WORKER_COUNT", "2"),
            ("SMSBATCH__SMSBATCH__SEND_CONCURRENCY", "4"),
        ],
    );
    let idle_rss_kb = server.rss_kb();

    let phones = csv_phones(100_000);
    let expected = Expected::of(&phones);
    assert!(
        expected.invalid >= 300 && expected.duplicates >= 300 && expected.failed() >= 5,
        "the generated mix: {} invalid, {} duplicates, {} permanent failures",
        expected.invalid,
        expected.duplicates,
        expected.failed()
    );
    let id = server.create_batch(&json!({
        "name": "csv-100k",
        "content": CONTENT,
        "url": URL,
        "message_type": "marketing",
    }));
    upload_ok(&server, &id, csv_body(&phones), 100_000, 100_000);

    server.action_ok(&id, "start", "preparing");
    server.wait_until(&id, "sending (results.sent > 0)", LONG, has_sent);

    let answer = server.action_ok(&id, "pause", "paused");
    assert!(
        has_sent(&answer),
        "the pause answers the counters as they are: {:#}",
        answer["results"]
    );
    // Provider calls already in flight may still finish; after that nothing moves.
    thread::sleep(Duration::from_secs(1));
    let first = server.batch(&id);
    thread::sleep(Duration::from_secs(1));
    let second = server.batch(&id);
    assert_eq!(first["state"], "paused", "{first:#}");
    assert_eq!(second["state"], "paused", "{second:#}");
    assert_eq!(
        processed(&first),
        processed(&second),
        "nothing is sent while paused: {:#} then {:#}",
        first["results"],
        second["results"]
    );
    assert!(
        processed(&second) < expected.valid,
        "paused before the end: {:#}",
        second["results"]
    );

    server.action_ok(&id, "resume", "delivering");
    let batch = server.wait_for_state(&id, &["completed"], LONG);
    assert_completed_counts(&batch, &expected);
    assert_steps_completed(&batch);

    let messages = message_statuses(&server, &id);
    assert_one_message_per_valid_recipient(&messages, &expected);
    let counts = status_counts(&messages);
    assert_eq!(
        counts,
        BTreeMap::from([
            ("failed".to_owned(), expected.failed()),
            ("sent".to_owned(), expected.sent()),
        ]),
        "message statuses (none pending or sending)"
    );
    let mut sent_listed = 0;
    server.for_each_message(&id, Some("sent"), |_| sent_listed += 1);
    assert_eq!(
        sent_listed,
        sent(&batch),
        "messages?status=sent = results.sent"
    );

    let peak_rss_kb = server.peak_rss_kb();
    let growth_kb = peak_rss_kb.saturating_sub(idle_rss_kb);
    eprintln!(
        "[{backend:?}] 100,000-row CSV batch: idle RSS {idle_rss_kb} kB, peak RSS {peak_rss_kb} kB, \
         growth {growth_kb} kB"
    );
    assert!(
        growth_kb < 100 * 1024,
        "memory must not grow with the batch: idle {idle_rss_kb} kB, peak {peak_rss_kb} kB"
    );
}

/// The lease upkeep of the live instance is held up past the lease (a busy database: here a
/// transaction locks the `leases` table for longer than the lease lasts) while provider calls are
/// in flight. When the upkeep gets through, the instance finds its own batch's lease expired and
/// its own heartbeat older than the lease; the claims under its id are still its workers', not a
/// dead instance's, so nothing may be settled as an orphan. Every recipient is sent once and none
/// ends with an unknown outcome.
#[test]
fn slow_lease_upkeep_leaves_the_instances_own_calls_to_finish() {
    const N: u64 = 24;
    let db = TestDb::new(Backend::Postgres);
    let server = TestServer::start(
        &db,
        &[
            ("SMSBATCH__SMSBATCH__LEASE_MS", "1000"),
            ("SMSBATCH__PROVIDERS__SIMULATOR__LATENCY_MS", "1000"),
            ("SMSBATCH__SMSBATCH__WORKER_COUNT", "1"),
            ("SMSBATCH__SMSBATCH__SEND_CONCURRENCY", "4"),
        ],
    );
    let id = server.create_batch(&small_batch("slow-lease-upkeep", N));
    server.action_ok(&id, "start", "preparing");
    // Four answered, one slice of the rest claimed and in flight for about five more seconds.
    wait_sent(&server, &id, 4);
    db.execute("BEGIN; LOCK TABLE leases IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(2.5); COMMIT;");

    let batch = server.wait_for_state(&id, &["completed", "failed", "paused"], SHORT);
    assert_eq!(
        (
            batch["state"].as_str(),
            results(&batch, ["valid", "sent", "failed", "cancelled"]),
        ),
        (
            Some("completed"),
            BTreeMap::from([("valid", N), ("sent", N), ("failed", 0), ("cancelled", 0)])
        ),
        "every recipient sent once, none settled as an orphan: {batch:#}"
    );
    assert_eq!(
        status_counts(&message_statuses(&server, &id)),
        BTreeMap::from([("sent".to_owned(), N)]),
        "message statuses"
    );
}

/// Three messages are left `sending` under the live instance's own id with no worker holding
/// them, as when a claim's commit succeeded but its answer was lost on the way back. Once delivery
/// makes no progress for `replan_after_ms`, the instance settles them (`unknown_outcome`, at most
/// once) and the batch completes instead of waiting for ever. Through RabbitMQ the quiet batch
/// waits, without polling, until the broker's queue is seen empty before it settles them.
fn a_stranded_claim_is_settled_and_the_batch_completes(backend: Backend) {
    const N: u64 = 40;
    const STRANDED: u64 = 3;
    let db = TestDb::new(backend);
    let server = TestServer::start(
        &db,
        &[
            // Longer than the instance's watch keeps nudging the batch after its last change
            // (its margin of 1 s, plus a look): the quiet spell itself must end the wait.
            ("SMSBATCH__SMSBATCH__REPLAN_AFTER_MS", "3000"),
            ("SMSBATCH__SMSBATCH__CLAIM_SIZE", "4"),
            // Slices of four at 500 ms each: the last messages stay pending for seconds after
            // the first are sent.
            ("SMSBATCH__PROVIDERS__SIMULATOR__LATENCY_MS", "500"),
            ("SMSBATCH__SMSBATCH__WORKER_COUNT", "1"),
            ("SMSBATCH__SMSBATCH__SEND_CONCURRENCY", "4"),
        ],
    );
    let id = server.create_batch(&small_batch("stranded-claim", N));
    server.action_ok(&id, "start", "preparing");
    wait_sent(&server, &id, 4);
    // The last three pending messages, claimed an hour ago under the server's own id.
    db.execute(&format!(
        "UPDATE messages SET status = 1, attempts = attempts + 1, updated_at = '2000-01-01 00:00:00', \
                claimed_by = (SELECT id FROM instances) \
         WHERE id IN (SELECT id FROM messages WHERE status = 0 ORDER BY id DESC LIMIT {STRANDED}) \
           AND status = 0"
    ));

    let batch = server.wait_for_state(&id, &["completed", "failed", "paused"], SHORT);
    assert_eq!(
        (
            batch["state"].as_str(),
            results(&batch, ["valid", "sent", "failed", "cancelled"]),
        ),
        (
            Some("completed"),
            BTreeMap::from([
                ("valid", N),
                ("sent", N - STRANDED),
                ("failed", STRANDED),
                ("cancelled", 0)
            ])
        ),
        "the stranded messages settled, the rest sent: {batch:#}"
    );
    let mut by_outcome: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (_, status, error) in message_statuses(&server, &id) {
        *by_outcome.entry((status, error)).or_insert(0) += 1;
    }
    assert_eq!(
        by_outcome,
        BTreeMap::from([
            (
                ("failed".to_owned(), "unknown_outcome".to_owned()),
                STRANDED
            ),
            (("sent".to_owned(), String::new()), N - STRANDED),
        ]),
        "message statuses and errors"
    );
}

fn cancel_mid_delivery_cancels_the_rest(backend: Backend) {
    let db = TestDb::new(backend);
    let server = TestServer::start(
        &db,
        &[
            ("SMSBATCH__PROVIDERS__SIMULATOR__LATENCY_MS", "1"),
            ("SMSBATCH__SMSBATCH__WORKER_COUNT", "1"),
            ("SMSBATCH__SMSBATCH__SEND_CONCURRENCY", "4"),
        ],
    );
    let phones = csv_phones(20_000);
    let expected = Expected::of(&phones);
    let id = server.create_batch(&json!({"name": "cancel-me", "content": CONTENT, "url": URL}));
    upload_ok(&server, &id, csv_body(&phones), 20_000, 20_000);

    server.action_ok(&id, "start", "preparing");
    server.wait_until(&id, "sending (results.sent > 0)", LONG, has_sent);
    server.action_ok(&id, "cancel", "cancelled");

    // Provider calls in flight at the cancel finish; then the counts are final.
    let batch = eventually("settled after the cancel", SHORT, || {
        let sending = server.all_messages(&id, Some("sending"));
        if !sending.is_empty() {
            return Err(format!("{} messages still sending", sending.len()));
        }
        let batch = server.batch(&id);
        let r = |k: &str| num(&batch, &format!("/results/{k}"));
        if r("valid") == r("sent") + r("delivered") + r("failed") + r("cancelled") {
            Ok(batch)
        } else {
            Err(format!("counts do not add up yet: {:#}", batch["results"]))
        }
    });
    assert_eq!(batch["state"], "cancelled", "{batch:#}");
    assert_prepared_counts(&batch, &expected);
    assert_outcome_rule(&batch);
    let cancelled = num(&batch, "/results/cancelled");
    assert!(
        cancelled > 0,
        "the rest was cancelled: {:#}",
        batch["results"]
    );

    let messages = message_statuses(&server, &id);
    assert_one_message_per_valid_recipient(&messages, &expected);
    let counts = status_counts(&messages);
    assert_eq!(
        counts.get("pending"),
        None,
        "no message left pending: {counts:?}"
    );
    assert_eq!(
        counts.get("sending"),
        None,
        "no message left sending: {counts:?}"
    );
    assert_eq!(
        counts.get("cancelled").copied().unwrap_or(0),
        cancelled,
        "messages?status=cancelled = results.cancelled"
    );
    assert_eq!(
        counts.get("sent").copied().unwrap_or(0),
        sent(&batch),
        "listed sent = results.sent"
    );
    for (phone, status, _) in &messages {
        if status == "failed" {
            assert!(
                expected.permanent.contains(phone),
                "only 0001 numbers fail: {phone}"
            );
        }
    }
    assert!(
        server.all_messages(&id, Some("pending")).is_empty(),
        "messages?status=pending is empty"
    );
}

/// SIGKILL while preparing: on PostgreSQL two writers commit chunks side by side, so the
/// checkpoint lags behind chunks already committed; the restart must skip those and prepare
/// every other recipient exactly once, with exact counts.
fn restart_mid_preparation_prepares_each_recipient_once(backend: Backend) {
    let db = TestDb::new(backend);
    let settings = [("SMSBATCH__SMSBATCH__BATCH_SIZE", "250")];
    let mut server = TestServer::start(&db, &settings);
    let phones = csv_phones(60_000);
    let expected = Expected::of(&phones);
    let id =
        server.create_batch(&json!({"name": "kill-preparing", "content": CONTENT, "url": URL}));
    upload_ok(&server, &id, csv_body(&phones), 60_000, 60_000);
    server.action_ok(&id, "start", "preparing");
    let at_kill = server.wait_until(&id, "a quarter prepared", LONG, |b| {
        num(b, "/results/valid") >= 15_000
    });
    server.kill();
    assert_eq!(
        at_kill["state"], "preparing",
        "killed while preparing: {at_kill:#}"
    );
    server.restart();

    let batch = server.wait_for_state(&id, &["completed"], LONG);
    assert_prepared_counts(&batch, &expected);
    assert_outcome_rule(&batch);
    let messages = message_statuses(&server, &id);
    assert_one_message_per_valid_recipient(&messages, &expected);
}

/// A batch whose messages start failing for good pauses itself once more than its
/// `failure_threshold` of a whole window failed, with a condition that says why, instead of
/// burning through the list; cancelling it then leaves exact counts.
fn too_many_failures_pause_the_batch(backend: Backend) {
    let db = TestDb::new(backend);
    let server = TestServer::start(
        &db,
        &[
            ("SMSBATCH__SMSBATCH__WORKER_COUNT", "2"),
            ("SMSBATCH__SMSBATCH__SEND_CONCURRENCY", "4"),
            ("SMSBATCH__SMSBATCH__FAILURE_WINDOW", "200"),
        ],
    );
    let (status, body) = server.post_json(
        "/v1/batches",
        &json!({"name": "bad-threshold", "content": CONTENT, "failure_threshold": 1.5}),
    );
    assert_eq!(status, 422, "{body:#}");
    assert_eq!(body["error"]["code"], "invalid", "{body:#}");

    // 1,000 good numbers, then 5,000 that the simulator refuses for good (ending 0001).
    let mut phones: Vec<String> = (0..1_000).map(|i| format!("+86139{i:04}1234")).collect();
    phones.extend((0..5_000).map(|i| format!("+86138{i:04}0001")));
    let id = server.create_batch(&json!({
        "name": "failing-gateway", "content": CONTENT, "url": URL, "failure_threshold": 0.2,
    }));
    assert_eq!(server.batch(&id)["failure_threshold"], 0.2);
    upload_ok(&server, &id, csv_body(&phones), 6_000, 6_000);
    server.action_ok(&id, "start", "preparing");

    let batch = server.wait_until(&id, "paused by itself", LONG, |b| b["state"] == "paused");
    let paused = batch["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Paused"))
        .cloned()
        .unwrap_or_else(|| panic!("a Paused condition: {batch:#}"));
    assert_eq!(paused["status"], "True", "{paused:#}");
    assert_eq!(paused["reason"], "FailureThresholdExceeded", "{paused:#}");
    let message = paused["message"].as_str().unwrap_or_default();
    assert!(message.contains("failure_threshold of 20.0%"), "{message}");
    assert_eq!(batch["steps"]["delivery"]["status"], "paused", "{batch:#}");

    // Calls in flight at the pause finish; then nothing moves.
    let batch = eventually("settled after the pause", SHORT, || {
        let sending = server.all_messages(&id, Some("sending"));
        if sending.is_empty() {
            Ok(server.batch(&id))
        } else {
            Err(format!("{} messages still sending", sending.len()))
        }
    });
    let failed = num(&batch, "/results/failed");
    let pending = num(&batch, "/results/pending");
    assert!(
        failed >= 40,
        "a whole window over 20% failed: {:#}",
        batch["results"]
    );
    assert!(
        pending > 0,
        "the batch stopped before burning through its list: {:#}",
        batch["results"]
    );
    assert_eq!(
        num(&batch, "/results/valid"),
        num(&batch, "/results/sent") + failed + pending,
        "valid = sent + failed + pending while paused: {:#}",
        batch["results"]
    );

    server.action_ok(&id, "cancel", "cancelled");
    let batch = eventually("every pending message cancelled", SHORT, || {
        let batch = server.batch(&id);
        let r = |k: &str| num(&batch, &format!("/results/{k}"));
        if r("valid") == r("sent") + r("failed") + r("cancelled") {
            Ok(batch)
        } else {
            Err(format!("counts do not add up yet: {:#}", batch["results"]))
        }
    });
    assert_eq!(
        num(&batch, "/results/cancelled"),
        pending,
        "{:#}",
        batch["results"]
    );
    assert_eq!(num(&batch, "/results/failed"), failed);
}

fn illegal_transitions_and_unknown_ids(backend: Backend) {
    let db = TestDb::new(backend);
    let server = TestServer::start(&db, &[]);

    // An initial batch can only be started or cancelled.
    let id = server.create_batch(&small_batch("transitions", 3));
    for action in ["pause", "resume", "retry"] {
        assert_error(
            &server.action(&id, action),
            409,
            "invalid_transition",
            &format!("{action} of an initial batch"),
        );
    }
    assert_eq!(
        server.batch(&id)["state"],
        "initial",
        "refused actions change nothing"
    );

    server.action_ok(&id, "start", "preparing");
    assert_error(
        &server.action(&id, "start"),
        409,
        "invalid_transition",
        "a second start",
    );
    let (status, body) = server.upload_csv(&id, "phone\n+8613870000005\n");
    assert_eq!(status, 409, "upload after start: {body:#}");
    assert_error_message(&body, "upload after start");

    let done = server.wait_for_state(&id, &["completed"], SHORT);
    assert_eq!(
        num(&done, "/results/recipients"),
        3,
        "the refused upload stored nothing"
    );
    for action in ACTIONS {
        assert_error(
            &server.action(&id, action),
            409,
            "invalid_transition",
            &format!("{action} of a completed batch"),
        );
    }

    // Cancel is allowed from initial; after it nothing is.
    let cancelled = server.create_batch(&small_batch("cancelled-early", 2));
    server.action_ok(&cancelled, "cancel", "cancelled");
    for action in ACTIONS {
        assert_error(
            &server.action(&cancelled, action),
            409,
            "invalid_transition",
            &format!("{action} of a cancelled batch"),
        );
    }

    // Unknown ids.
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_error(
        &server.get_json(&format!("/v1/batches/{unknown}")),
        404,
        "not_found",
        "GET of an unknown batch",
    );
    assert_error(
        &server.get_json(&format!("/v1/batches/{unknown}/messages")),
        404,
        "not_found",
        "messages of an unknown batch",
    );
    for action in ACTIONS {
        assert_error(
            &server.action(&unknown, action),
            404,
            "not_found",
            &format!("{action} of an unknown batch"),
        );
    }
    assert_error(
        &server.upload_csv(&unknown, "phone\n+8613870000005\n"),
        404,
        "not_found",
        "upload to an unknown batch",
    );
    let (status, body) = server.get_json("/v1/batches/not-a-uuid");
    assert!(
        status == 404 || status == 400,
        "GET /v1/batches/not-a-uuid answered {status}: {body:#}"
    );
    assert_error_message(&body, "GET /v1/batches/not-a-uuid");

    // Invalid creations store nothing.
    let mut empty_content = small_batch("empty-content", 1);
    empty_content["content"] = json!("");
    assert_error(
        &server.post_json("/v1/batches", &empty_content),
        422,
        "invalid",
        "empty content",
    );
    for partitions in [0, 257] {
        let mut body = small_batch("bad-partitions", 1);
        body["partition_count"] = json!(partitions);
        assert_error(
            &server.post_json("/v1/batches", &body),
            422,
            "invalid",
            &format!("partition_count {partitions}"),
        );
    }
    let mut unknown_provider = small_batch("unknown-provider", 1);
    unknown_provider["provider"] = json!("no-such-provider");
    assert_error(
        &server.post_json("/v1/batches", &unknown_provider),
        422,
        "invalid",
        "unknown provider",
    );
    assert_error(
        &server.post_raw(
            "/v1/batches",
            "application/json",
            r#"{"name": "broken", "content": "#,
        ),
        400,
        "bad_request",
        "malformed JSON",
    );

    let (status, list) = server.get_json("/v1/batches?limit=100");
    assert_eq!(status, 200, "{list:#}");
    let mut ids: Vec<&str> = list["items"]
        .as_array()
        .map(|items| items.iter().filter_map(|b| b["id"].as_str()).collect())
        .unwrap_or_default();
    ids.sort_unstable();
    let mut wanted = vec![id.as_str(), cancelled.as_str()];
    wanted.sort_unstable();
    assert_eq!(
        ids, wanted,
        "only the two valid creations are stored: {list:#}"
    );
}

fn csv_without_phone_column_stores_nothing(backend: Backend) {
    let db = TestDb::new(backend);
    let server = TestServer::start(&db, &[]);
    let id = server.create_batch(&json!({"name": "csv-errors", "content": CONTENT, "url": URL}));
    let recipients = |server: &TestServer| num(&server.batch(&id), "/results/recipients");

    assert_error(
        &server.upload_csv(&id, "number,name\n+8613870000005,Ann\n+8613870000015,Bob\n"),
        400,
        "bad_csv",
        "a CSV without a phone column",
    );
    assert_eq!(recipients(&server), 0, "nothing stored");

    // The 3rd data row (line 4 of the file) has an extra column.
    let ragged = "phone,name\n\
                  +8613870000005,Ann\n\
                  +8613870000015,Bob\n\
                  +8613870000025,Cid,extra\n\
                  +8613870000035,Dan\n";
    let reply = server.upload_csv(&id, ragged);
    assert_error(&reply, 400, "bad_csv", "a row with the wrong column count");
    let message = text(&reply.1, "/error/message");
    assert!(
        message
            .split(|c: char| !c.is_ascii_digit())
            .any(|number| number == "4"),
        "the error names line 4: {message}"
    );
    assert_eq!(recipients(&server), 0, "a malformed upload stores nothing");

    let mut good = String::from("phone,name\n");
    for k in 0..9u64 {
        let _ = writeln!(good, "{},Guest {k}", mobile(70_000_005 + k * 10));
    }
    // RFC 4180 quoting: a comma inside a quoted field.
    good.push_str("\"+8613870000095\",\"Doe, Jane\"\n");
    upload_ok(&server, &id, good, 10, 10);
    let more: String = (0..5u64).fold(String::from("phone,name\n"), |mut csv, k| {
        let _ = writeln!(csv, "{},Late {k}", mobile(71_000_005 + k * 10));
        csv
    });
    upload_ok(&server, &id, more, 5, 15);
    assert_eq!(recipients(&server), 15);

    server.action_ok(&id, "start", "preparing");
    let batch = server.wait_for_state(&id, &["completed"], SHORT);
    let all: Vec<String> = (0..9u64)
        .map(|k| mobile(70_000_005 + k * 10))
        .chain(["+8613870000095".to_owned()])
        .chain((0..5u64).map(|k| mobile(71_000_005 + k * 10)))
        .collect();
    assert_completed_counts(&batch, &Expected::of(&all));
}

fn restart_mid_delivery_finishes_with_exact_counts(backend: Backend) {
    let db = TestDb::new(backend);
    let mut server = TestServer::start(
        &db,
        &[
            ("SMSBATCH__PROVIDERS__SIMULATOR__LATENCY_MS", "1"),
            ("SMSBATCH__SMSBATCH__WORKER_COUNT", "2"),
            ("SMSBATCH__SMSBATCH__SEND_CONCURRENCY", "4"),
        ],
    );
    let phones = csv_phones(20_000);
    let expected = Expected::of(&phones);
    let id = server.create_batch(&json!({
        "name": "survives-sigkill",
        "content": CONTENT,
        "url": URL,
        "message_type": "marketing",
    }));
    upload_ok(&server, &id, csv_body(&phones), 20_000, 20_000);

    server.action_ok(&id, "start", "preparing");
    server.wait_until(&id, "sending (results.sent > 0)", LONG, has_sent);
    server.kill();
    server.restart();

    let batch = server.wait_for_state(&id, &["completed"], LONG);
    assert_prepared_counts(&batch, &expected);
    assert_outcome_rule(&batch);
    assert_eq!(
        num(&batch, "/results/cancelled"),
        0,
        "{:#}",
        batch["results"]
    );

    let messages = message_statuses(&server, &id);
    assert_one_message_per_valid_recipient(&messages, &expected);
    let counts = status_counts(&messages);
    assert_eq!(
        counts.get("pending"),
        None,
        "no message left pending: {counts:?}"
    );
    assert_eq!(
        counts.get("sending"),
        None,
        "no message left sending: {counts:?}"
    );
    assert_eq!(
        counts.get("sent").copied().unwrap_or(0),
        sent(&batch),
        "listed sent = results.sent"
    );
    assert_eq!(
        counts.get("failed").copied().unwrap_or(0),
        num(&batch, "/results/failed"),
        "listed failed = results.failed"
    );

    // Failures are the 0001 numbers, plus messages whose outcome the kill made unknown.
    let mut unknown_outcome = 0;
    let mut failed_for_a_reason = BTreeSet::new();
    let mut failed_phones = BTreeSet::new();
    for (phone, status, error) in &messages {
        if status != "failed" {
            continue;
        }
        failed_phones.insert(phone.clone());
        if error.contains("unknown_outcome") {
            unknown_outcome += 1;
        } else {
            failed_for_a_reason.insert(phone.clone());
        }
    }
    eprintln!("[{backend:?}] after SIGKILL: {unknown_outcome} messages with unknown_outcome");
    assert!(
        failed_for_a_reason.is_subset(&expected.permanent),
        "only 0001 numbers fail for a provider reason: {:?}",
        failed_for_a_reason
            .difference(&expected.permanent)
            .collect::<Vec<_>>()
    );
    assert!(
        expected.permanent.is_subset(&failed_phones),
        "every 0001 number failed: missing {:?}",
        expected
            .permanent
            .difference(&failed_phones)
            .collect::<Vec<_>>()
    );
    let permanent_with_unknown = expected
        .permanent
        .iter()
        .filter(|p| !failed_for_a_reason.contains(*p))
        .count();
    assert_eq!(
        failed_for_a_reason.len() + permanent_with_unknown,
        expected.permanent.len(),
        "failures with a provider reason = the 0001 numbers (less any whose call the kill cut)"
    );
}

fn scheduled_batch_starts_when_due(backend: Backend) {
    let db = TestDb::new(backend);
    let mut server = TestServer::start(&db, &[]);

    let mut body = small_batch("scheduled", 3);
    body["schedule_at"] = json!(rfc3339_in(Duration::from_secs(3)));
    let created_at = Instant::now();
    let id = server.create_batch(&body);
    server.action_ok(&id, "start", "scheduled");
    let now = server.batch(&id);
    if created_at.elapsed() < Duration::from_secs(2) {
        assert_eq!(now["state"], "scheduled", "not due yet: {now:#}");
    }
    let batch = server.wait_for_state(&id, &["completed"], SHORT);
    assert_eq!(sent(&batch), 3, "{:#}", batch["results"]);
    assert_steps_completed(&batch);

    // A schedule survives a crash: the restarted server wakes the batch when due.
    let mut body = small_batch("scheduled-across-restart", 3);
    body["schedule_at"] = json!(rfc3339_in(Duration::from_secs(4)));
    let id = server.create_batch(&body);
    server.action_ok(&id, "start", "scheduled");
    server.kill();
    server.restart();
    let batch = server.wait_for_state(&id, &["completed"], SHORT);
    assert_eq!(sent(&batch), 3, "{:#}", batch["results"]);
    assert_outcome_rule(&batch);
}

fn probes_and_metrics(backend: Backend) {
    let db = TestDb::new(backend);
    let server = TestServer::start(&db, &[]);

    let (status, health) = server.get_json("/healthz");
    assert_eq!(
        (status, &health["status"]),
        (200, &json!("ok")),
        "{health:#}"
    );

    // Ready once every dependency answers (the broker connects in the background).
    let ready = eventually("ready", SHORT, || match server.get_json("/readyz") {
        (200, body) => Ok(body),
        (status, body) => Err(format!("{status}: {body:#}")),
    });
    assert_eq!(ready["status"], "healthy", "{ready:#}");
    for check in ["/checks/database", "/checks/queue"] {
        assert_eq!(ready.pointer(check), Some(&json!("ok")), "{ready:#}");
    }

    let mut body = small_batch("metrics", 4);
    body["recipients"]
        .as_array_mut()
        .expect("recipients array")
        .push(json!({"phone": mobile(60_100_001), "vars": {"name": "Fails"}}));
    let id = server.create_batch(&body);
    server.action_ok(&id, "start", "preparing");
    let batch = server.wait_for_state(&id, &["completed"], SHORT);
    assert_eq!(
        (sent(&batch), num(&batch, "/results/failed")),
        (4, 1),
        "{:#}",
        batch["results"]
    );

    let metrics = server.get("/metrics");
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    assert!(
        metrics.content_type.starts_with("text/plain"),
        "Prometheus text format, got {:?}",
        metrics.content_type
    );
    for name in [
        "smsbatch_batches",
        "smsbatch_messages_total",
        "smsbatch_preparation_rows_total",
        "smsbatch_provider_request_seconds",
        "smsbatch_mailbox_depth",
    ] {
        assert!(
            metrics.body.contains(name),
            "/metrics has {name}:\n{}",
            metrics.body
        );
    }
}

/// A step that keeps failing (here: a batch row whose template was corrupted behind the
/// service's back) is restarted `retry_count` times, then the batch goes `failed` with the error
/// and a condition; once the cause is fixed, `retry` continues it to `completed`.
fn failing_step_fails_the_batch_and_retry_resumes_it(backend: Backend) {
    let db = TestDb::new(backend);
    let server = TestServer::start(&db, &[("SMSBATCH__SMSBATCH__RETRY_COUNT", "2")]);
    let id = server.create_batch(&small_batch("doomed", 20));
    db.execute(&format!(
        "UPDATE batches SET content = 'Hi {{{{name' WHERE public_id = '{id}'"
    ));
    server.action_ok(&id, "start", "preparing");
    let failed = server.wait_for_state(&id, &["failed"], SHORT);
    let error = text(&failed, "/error");
    assert!(error.contains("template"), "the error says why: {failed:#}");
    assert_eq!(
        text(&failed, "/steps/preparation/status"),
        "failed",
        "{failed:#}"
    );
    assert_eq!(
        text(&failed, "/steps/preparation/error"),
        error,
        "{failed:#}"
    );
    assert_eq!(text(&failed, "/resume_to"), "preparing", "{failed:#}");
    let conditions = failed["conditions"].as_array().expect("conditions");
    assert!(
        conditions
            .iter()
            .any(|c| c["type"] == "Failed" && c["status"] == "True" && c["message"] == error),
        "a Failed condition carries the error: {failed:#}"
    );
    let metrics = server.get("/metrics").body;
    assert!(
        metrics.contains("smsbatch_step_restarts_total{step=\"preparation\"} 2"),
        "two restarts before failing:\n{metrics}"
    );
    // Nothing but retry moves a failed batch.
    for action in ["start", "pause", "resume"] {
        assert_error(
            &server.action(&id, action),
            409,
            "invalid_transition",
            action,
        );
    }

    db.execute(&format!(
        "UPDATE batches SET content = 'Hi {{{{name}}}}' WHERE public_id = '{id}'"
    ));
    server.action_ok(&id, "retry", "preparing");
    let done = server.wait_for_state(&id, &["completed"], SHORT);
    assert_eq!(num(&done, "/results/valid"), 20, "{done:#}");
    assert_eq!(sent(&done), 20, "{done:#}");
    assert!(done["error"].is_null(), "{done:#}");
    assert_eq!(
        text(&done, "/steps/preparation/status"),
        "completed",
        "{done:#}"
    );
}

/// A batch row whose state names no state (written behind the service's back) is not read as
/// some default state: the batch answers 500 `internal` (the cause in the server's log), its
/// actions too, and the service goes on serving the other batches.
fn a_corrupt_state_is_an_internal_error(backend: Backend) {
    let db = TestDb::new(backend);
    let server = TestServer::start(&db, &[]);
    let id = server.create_batch(&small_batch("corrupt", 3));
    let other = server.create_batch(&small_batch("sound", 3));
    db.execute(&format!(
        "UPDATE batches SET state = 'halfway' WHERE public_id = '{id}'"
    ));
    let reply = server.get_json(&format!("/v1/batches/{id}"));
    assert_error(&reply, 500, "internal", "GET of the corrupt batch");
    assert_error(
        &server.action(&id, "start"),
        500,
        "internal",
        "start of the corrupt batch",
    );
    assert_eq!(server.batch(&other)["state"], "initial");
    server.action_ok(&other, "start", "preparing");
    server.wait_for_state(&other, &["completed"], SHORT);
    let (status, body) = server.get_json("/healthz");
    assert_eq!(status, 200, "{body:#}");
}

/// A batch whose rows stop agreeing with its counters (here: a sent message turned `failed`
/// behind the service's back while it delivers) is not declared `completed` on the counters'
/// word: at the end of delivery the supervisor counts the rows, and the batch goes `failed` with
/// a condition that says which count did not add up.
fn counts_that_do_not_add_up_fail_the_batch(backend: Backend) {
    let db = TestDb::new(backend);
    let server = TestServer::start(
        &db,
        &[
            ("SMSBATCH__PROVIDERS__SIMULATOR__LATENCY_MS", "2"),
            ("SMSBATCH__SMSBATCH__WORKER_COUNT", "1"),
            ("SMSBATCH__SMSBATCH__SEND_CONCURRENCY", "1"),
        ],
    );
    let id = server.create_batch(&small_batch("tampered", 2000));
    server.action_ok(&id, "start", "preparing");
    server.wait_until(&id, "sending (results.sent > 0)", LONG, has_sent);
    db.execute(&format!(
        "UPDATE messages SET status = 4, error = 'tampered' WHERE id = (SELECT min(m.id) \
         FROM messages m JOIN batches b ON b.id = m.batch_id \
         WHERE b.public_id = '{id}' AND m.status = 2)"
    ));
    let failed = server.wait_for_state(&id, &["failed"], LONG);
    assert_eq!(text(&failed, "/resume_to"), "delivering", "{failed:#}");
    assert_eq!(
        text(&failed, "/steps/delivery/status"),
        "failed",
        "{failed:#}"
    );
    let condition = failed["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Failed"))
        .unwrap_or_else(|| panic!("a Failed condition: {failed:#}"));
    assert_eq!(condition["status"], "True", "{condition:#}");
    assert_eq!(condition["reason"], "CountsDoNotAddUp", "{condition:#}");
    let message = text(condition, "/message");
    assert!(
        message.contains("1999 messages are sent but the counters say 2000")
            && message.contains("1 messages are failed but the counters say 0"),
        "the condition names the counts: {message}"
    );
    assert_eq!(text(&failed, "/error"), message, "{failed:#}");
}

/// SIGTERM mid-delivery drains: the server stops sending, puts what it had claimed back,
/// exits 0, and the next start finishes the batch with every count exact — no message is left
/// with an unknown outcome, unlike after a SIGKILL.
fn sigterm_drains_and_restart_finishes_exactly(backend: Backend) {
    let db = TestDb::new(backend);
    let mut server = TestServer::start(
        &db,
        &[
            ("SMSBATCH__PROVIDERS__SIMULATOR__LATENCY_MS", "1"),
            ("SMSBATCH__SMSBATCH__WORKER_COUNT", "2"),
            ("SMSBATCH__SMSBATCH__SEND_CONCURRENCY", "4"),
        ],
    );
    let phones = csv_phones(10_000);
    let expected = Expected::of(&phones);
    let id = server.create_batch(&json!({"name": "drains", "content": CONTENT, "url": URL}));
    upload_ok(&server, &id, csv_body(&phones), 10_000, 10_000);
    server.action_ok(&id, "start", "preparing");
    server.wait_until(&id, "sending (results.sent > 0)", LONG, has_sent);

    let (code, _took) = server.terminate();
    assert_eq!(code, Some(0), "SIGTERM exits 0");
    server.restart();
    let batch = server.wait_for_state(&id, &["completed"], LONG);
    assert_completed_counts(&batch, &expected);
    let failed = server.all_messages(&id, Some("failed"));
    assert!(
        failed.iter().all(|m| m["error"] != "unknown_outcome"),
        "a drained shutdown leaves no unknown outcome: {failed:?}"
    );
}

/// A bad configuration value stops start-up with a message that names the key.
#[test]
fn bad_configuration_stops_startup_naming_the_key() {
    for (var, value, key) in [
        (
            "SMSBATCH__SMSBATCH__WORKER_COUNT",
            "many",
            "smsbatch.worker_count",
        ),
        ("SMSBATCH__HTTP__BIND", "nowhere", "http.bind"),
        ("SMSBATCH__DATABASE__URL", "mysql://db/x", "database.url"),
        (
            "SMSBATCH__SMSBATCH__DEFAULT_REGION",
            "Atlantis",
            "smsbatch.default_region",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_smsbatch"))
            .arg("serve")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env(var, value)
            .output()
            .expect("run smsbatch");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} must stop start-up");
        assert!(
            stderr.contains(key),
            "{var}={value}: the message names `{key}`: {stderr}"
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).is_empty(),
            "{var}={value}: nothing listens: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A service whose stdout is a pipe nobody reads any more (`smsbatch serve | head -1` once
/// `head` has its line, or a supervisor that closed it) keeps serving: its writes there fail,
/// and nothing stops on that. Here the pipe is closed before the service writes anything.
#[test]
fn a_closed_stdout_keeps_the_service_serving() {
    use std::process::{Command, Stdio};

    let db = TestDb::new(Backend::Sqlite);
    let port = crate::common::faults::free_port();
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let mut child = Command::new(env!("CARGO_BIN_EXE_smsbatch"))
        .arg("serve")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("SMSBATCH__HTTP__BIND", format!("127.0.0.1:{port}"))
        .env("SMSBATCH__DATABASE__URL", db.url())
        .env("SMSBATCH__LOG__LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the smsbatch binary");
    let base = format!("http://127.0.0.1:{port}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    // Until it answers, or exits (the failure this test is about), or a minute has passed.
    let give_up = Instant::now() + Duration::from_secs(60);
    let healthy = loop {
        let answered = agent
            .get(format!("{base}/healthz"))
            .call()
            .is_ok_and(|r| r.status() == 200);
        if answered || child.try_wait().is_ok_and(|status| status.is_some()) {
            break answered;
        }
        if Instant::now() > give_up {
            break false;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let created = agent
        .post(format!("{base}/v1/batches"))
        .send_json(
            json!({"name": "piped", "content": "Hi", "url": "https://example.com",
            "recipients": [{"phone": "+8613800001234"}]}),
        )
        .map(|r| r.status().as_u16());
    let exited = child.try_wait().expect("poll the child");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(exited, None, "the service is still running");
    assert!(healthy, "the service answers /healthz");
    assert_eq!(created.expect("the service answers"), 201);
}

/// The broker connection drops mid-delivery (a proxy between the service and RabbitMQ cuts it):
/// `/readyz` reports the queue check failing, the batch is not failed and waits, and once the
/// connection is back it completes with exact counts and nothing sent twice or lost.
#[test]
fn broker_outage_mid_delivery_ends_exact() {
    let db = TestDb::new(Backend::PostgresRabbitmq);
    let proxy = crate::common::TcpProxy::start("127.0.0.1:5672");
    let amqp = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port());
    let server = TestServer::start(
        &db,
        &[
            ("SMSBATCH__TRANSPORT__AMQP_URL", amqp.as_str()),
            ("SMSBATCH__PROVIDERS__SIMULATOR__LATENCY_MS", "1"),
            ("SMSBATCH__SMSBATCH__WORKER_COUNT", "2"),
            ("SMSBATCH__SMSBATCH__SEND_CONCURRENCY", "4"),
        ],
    );
    let phones = csv_phones(10_000);
    let expected = Expected::of(&phones);
    let id = server.create_batch(&json!({"name": "outage", "content": CONTENT, "url": URL}));
    upload_ok(&server, &id, csv_body(&phones), 10_000, 10_000);
    server.action_ok(&id, "start", "preparing");
    server.wait_until(&id, "sending (results.sent > 0)", LONG, has_sent);

    proxy.cut();
    let unready = eventually("unready", SHORT, || match server.get_json("/readyz") {
        (503, body) => Ok(body),
        (status, body) => Err(format!("{status}: {body:#}")),
    });
    assert_eq!(unready["status"], "unhealthy", "{unready:#}");
    assert_eq!(unready.pointer("/checks/database"), Some(&json!("ok")));
    assert_ne!(unready.pointer("/checks/queue"), Some(&json!("ok")));
    thread::sleep(Duration::from_secs(2));
    let waiting = server.batch(&id);
    assert!(
        ["preparing", "delivering"].contains(&text(&waiting, "/state")),
        "the batch waits for the broker instead of failing: {waiting:#}"
    );

    proxy.restore();
    let batch = server.wait_for_state(&id, &["completed"], LONG);
    assert_completed_counts(&batch, &expected);
    let failed = server.all_messages(&id, Some("failed"));
    assert!(
        failed.iter().all(|m| m["error"] != "unknown_outcome"),
        "a broker outage leaves no unknown outcome"
    );
    let (status, _) = server.get_json("/readyz");
    assert_eq!(status, 200, "ready again once the broker is back");
}

/// Messages a server's own workers handed to a provider and that the provider took, from its
/// `/metrics`.
fn sent_by(server: &TestServer) -> u64 {
    let metrics = server.get("/metrics").body;
    metrics
        .lines()
        .filter(|l| l.starts_with("smsbatch_messages_total{") && l.contains("outcome=\"sent\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Two instances on one PostgreSQL and one RabbitMQ share a 100,000-recipient batch: both
/// instances' workers send (their metrics say so), a pause and a resume through the instance
/// that does not supervise the batch take effect, and the counts are exact with every message
/// sent once (the instances' sent counters add up to the batch's).
#[test]
fn two_instances_share_one_batch() {
    let db = TestDb::new(Backend::PostgresRabbitmq);
    let env = [
        ("SMSBATCH__PROVIDERS__SIMULATOR__LATENCY_MS", "1"),
        ("SMSBATCH__SMSBATCH__WORKER_COUNT", "2"),
    ];
    let a = TestServer::start(&db, &env);
    let b = TestServer::start(&db, &env);
    let phones = csv_phones(100_000);
    let expected = Expected::of(&phones);
    let id = a.create_batch(&json!({"name": "shared", "content": CONTENT, "url": URL}));
    upload_ok(&a, &id, csv_body(&phones), 100_000, 100_000);
    a.action_ok(&id, "start", "preparing");
    a.wait_until(&id, "both instances sending", LONG, |_| {
        sent_by(&a) > 0 && sent_by(&b) > 0
    });

    // The batch is supervised by `a`; `b` pauses it, and `a` acts on it within a second (its
    // watch looks every `poll_ms`, 250 ms).
    b.action_ok(&id, "pause", "paused");
    thread::sleep(Duration::from_secs(1));
    let before = sent(&a.batch(&id));
    thread::sleep(Duration::from_secs(1));
    let after = sent(&a.batch(&id));
    assert_eq!(
        before, after,
        "no message is sent while the batch is paused"
    );
    b.action_ok(&id, "resume", "delivering");

    let batch = a.wait_for_state(&id, &["completed"], LONG);
    assert_completed_counts(&batch, &expected);
    let (by_a, by_b) = (sent_by(&a), sent_by(&b));
    eprintln!("sent by a: {by_a}, by b: {by_b}");
    assert!(by_a > 0 && by_b > 0, "both instances sent: {by_a} / {by_b}");
    assert_eq!(
        by_a + by_b,
        sent(&batch),
        "every message was handed to the provider by exactly one instance"
    );
}

/// SIGKILL of the instance that supervises a batch mid-delivery: the other instance takes the
/// batch over once the lease expires and finishes it with exact counts.
#[test]
fn killing_the_supervising_instance_lets_the_other_finish() {
    let db = TestDb::new(Backend::PostgresRabbitmq);
    let env = [
        ("SMSBATCH__PROVIDERS__SIMULATOR__LATENCY_MS", "1"),
        ("SMSBATCH__SMSBATCH__WORKER_COUNT", "2"),
        ("SMSBATCH__SMSBATCH__SEND_CONCURRENCY", "4"),
    ];
    let mut a = TestServer::start(&db, &env);
    let b = TestServer::start(&db, &env);
    let phones = csv_phones(20_000);
    let expected = Expected::of(&phones);
    let id = a.create_batch(&json!({"name": "orphaned", "content": CONTENT, "url": URL}));
    upload_ok(&a, &id, csv_body(&phones), 20_000, 20_000);
    a.action_ok(&id, "start", "preparing");
    a.wait_until(&id, "sending (results.sent > 0)", LONG, has_sent);
    a.kill();

    let batch = b.wait_for_state(&id, &["completed"], LONG);
    assert_prepared_counts(&batch, &expected);
    assert_outcome_rule(&batch);
    let messages = message_statuses(&b, &id);
    assert_one_message_per_valid_recipient(&messages, &expected);
    let mut failed_for_a_reason = BTreeSet::new();
    let mut unknown = 0;
    for (phone, status, error) in &messages {
        assert!(
            status == "sent" || status == "failed",
            "{phone} ended {status}"
        );
        if status == "failed" {
            if error.contains("unknown_outcome") {
                unknown += 1;
            } else {
                failed_for_a_reason.insert(phone.clone());
            }
        }
    }
    eprintln!("after SIGKILL of the supervising instance: {unknown} unknown outcomes");
    assert!(
        failed_for_a_reason.is_subset(&expected.permanent),
        "only 0001 numbers fail for a provider reason"
    );
}
