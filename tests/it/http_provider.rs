//! The `http` provider end to end: the real `smsbatch` binary sends a batch through a
//! JSON-over-HTTP gateway — the test's sink (`tests/it/common/sink.rs`) — that fails the first
//! requests with 503 and refuses numbers ending `0003` with 400. What the sink received is
//! counted outside the service: every valid number the gateway did not refuse reached it exactly
//! once as an acceptance, a refused number is counted failed, and every resend carried the same
//! idempotency key. On SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::json;

use crate::common::sink::{Answer, Received, Sink};
use crate::common::{Backend, TestDb, TestServer, assert_error, mobile, num, text};

/// Only stops a stuck test.
const DEADLINE: Duration = Duration::from_secs(600);
/// The requests the sink answers 503 before it recovers.
const OUTAGE: usize = 200;
/// The provider's name in the server's configuration.
const PROVIDER: &str = "sink";
const CONTENT: &str = "Hi {{name}}, your code is ready: {{url}}";
const URL: &str = "https://shop.example/c";

#[test]
fn http_provider_sends_each_message_once_sqlite() {
    sends_each_message_once(Backend::Sqlite);
}

#[test]
fn http_provider_sends_each_message_once_postgres() {
    sends_each_message_once(Backend::Postgres);
}

/// 3,029 distinct valid numbers (30 of them end in `0003`), 8 invalid ones and 12 exact
/// duplicates.
fn recipients() -> Vec<String> {
    let mut phones: Vec<String> = (0..3000).map(|k| mobile(50_000_000 + k * 3)).collect();
    phones.extend((0..29).map(|k| mobile(51_000_003 + k * 10_000)));
    phones.extend(["12345", "not-a-phone", "+86123", ""].map(String::from));
    phones.extend((0..4).map(|k| format!("bad-{k}")));
    let duplicates: Vec<String> = (0..12).map(|k| phones[k * 101].clone()).collect();
    phones.extend(duplicates);
    phones
}

fn is_valid(phone: &str) -> bool {
    phone.len() == 14 && phone.starts_with("+86138")
}

/// A `phone,name` CSV of `phones`; row `i` is named `Customer i`.
fn csv_body(phones: &[String]) -> String {
    let mut csv = String::from("phone,name\n");
    for (i, phone) in phones.iter().enumerate() {
        let _ = writeln!(csv, "{phone},Customer {i}");
    }
    csv
}

fn sends_each_message_once(backend: Backend) {
    let sink = Sink::start();
    sink.fail_next(OUTAGE as u64, 503);
    sink.refuse_ending(&["0003"], 400);
    let db = TestDb::new(backend);
    let url = sink.url();
    let server = TestServer::start(
        &db,
        &[
            ("SMSBATCH__PROVIDERS__HTTP__SINK__URL", url.as_str()),
            (
                "SMSBATCH__PROVIDERS__HTTP__SINK__HEADERS__AUTHORIZATION",
                "Bearer sink-token",
            ),
            ("SMSBATCH__PROVIDERS__HTTP__SINK__TIMEOUT_MS", "5000"),
            // Enough retries that a message caught by the outage more than once still goes.
            ("SMSBATCH__SMSBATCH__RETRY_COUNT", "5"),
        ],
    );

    // A provider the configuration does not name is refused at creation.
    let unknown = json!({"name": "nowhere", "content": CONTENT, "provider": "nope"});
    assert_error(
        &server.post_json("/v1/batches", &unknown),
        422,
        "invalid",
        "unknown provider",
    );

    let phones = recipients();
    let valid: BTreeSet<&str> = phones
        .iter()
        .map(String::as_str)
        .filter(|p| is_valid(p))
        .collect();
    let refused: BTreeSet<&str> = valid
        .iter()
        .copied()
        .filter(|p| p.ends_with("0003"))
        .collect();
    // The text each number must receive: its first row's name.
    let mut first_row: HashMap<&str, usize> = HashMap::new();
    for (i, phone) in phones.iter().enumerate() {
        first_row.entry(phone.as_str()).or_insert(i);
    }
    assert_eq!((valid.len(), refused.len()), (3029, 30));

    let id = server.create_batch(&json!({
        "name": "through-the-sink", "content": CONTENT, "url": URL, "provider": PROVIDER,
    }));
    let (status, body) = server.upload_csv(&id, csv_body(&phones));
    assert_eq!(status, 200, "upload answered {status}: {body:#}");
    assert_eq!(num(&body, "/accepted"), phones.len() as u64, "{body:#}");
    server.action_ok(&id, "start", "preparing");
    let batch = server.wait_for_state(&id, &["completed"], DEADLINE);

    // The batch's own counts.
    assert_eq!(text(&batch, "/provider"), PROVIDER);
    let r = |k: &str| num(&batch, &format!("/results/{k}"));
    let results: BTreeMap<&str, u64> = [
        "recipients",
        "valid",
        "invalid",
        "duplicates",
        "sent",
        "delivered",
        "failed",
        "cancelled",
    ]
    .into_iter()
    .map(|k| (k, r(k)))
    .collect();
    let wanted = BTreeMap::from([
        ("recipients", phones.len() as u64),
        ("valid", valid.len() as u64),
        ("invalid", 8),
        ("duplicates", 12),
        ("sent", (valid.len() - refused.len()) as u64),
        ("delivered", 0),
        ("failed", refused.len() as u64),
        ("cancelled", 0),
    ]);
    assert_eq!(results, wanted, "results of {:#}", batch["results"]);
    assert_eq!(r("sent") + r("failed"), r("valid"));

    // What the sink received.
    let received = sink.received();
    let report = sink.report();
    let answered = |pick: fn(&Received) -> bool| received.iter().filter(|r| pick(r)).count();
    assert_eq!(report.malformed, 0, "the provider always sends its JSON");
    assert_eq!(
        answered(|r| r.answer == Answer::Refused(503)),
        OUTAGE,
        "the outage took its {OUTAGE} requests"
    );
    assert_eq!(
        report.total,
        report.accepted + answered(|r| r.answer == Answer::Refused(400)) + OUTAGE,
        "every request was accepted, refused or caught by the outage"
    );
    assert!(
        report.accepted_twice.is_empty(),
        "messages accepted twice (sent twice): {:?}",
        &report.accepted_twice[..report.accepted_twice.len().min(10)]
    );
    assert_eq!(
        report.accepted as u64,
        r("sent"),
        "one acceptance per sent message"
    );
    assert_eq!(
        report.key_mismatches, 0,
        "every request carries its id as key"
    );
    assert!(
        received
            .iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer sink-token")),
        "every request carries the configured header"
    );
    let reached: BTreeSet<&str> = report.per_phone.keys().map(String::as_str).collect();
    assert_eq!(
        reached, valid,
        "the sink saw every valid number and nothing else"
    );
    for (phone, count) in &report.per_phone {
        let expected = usize::from(!refused.contains(phone.as_str()));
        assert_eq!(count.accepted, expected, "{phone}: acceptances {count:?}");
    }
    // A message the gateway saw more than once was resent after a transient answer, with the
    // same idempotency key and a higher attempt each time.
    for duplicate in &report.duplicates {
        assert!(duplicate.keys_match, "{duplicate:?}");
        assert!(
            duplicate.attempts.windows(2).all(|w| w[0] < w[1]),
            "{duplicate:?}"
        );
    }
    let mut requests: HashMap<i64, Vec<&Received>> = HashMap::new();
    for r in &received {
        requests.entry(r.id).or_default().push(r);
    }
    let retried = requests
        .values()
        .filter(|rs| rs.iter().any(|r| r.answer == Answer::Refused(503)))
        .count();
    assert!(retried > 0, "the outage caught some messages");
    for rs in requests.values() {
        assert_eq!(
            rs[0].attempt, 1,
            "a message's first request is attempt 1: {rs:?}"
        );
        // A 503 is never the last word: the message was sent again.
        let last = rs.last().map(|r| r.answer);
        assert!(
            matches!(last, Some(Answer::Accepted(_) | Answer::Refused(400))),
            "{rs:?}"
        );
        let row = first_row[rs[0].to.as_str()];
        let text = format!("Hi Customer {row}, your code is ready: {URL}");
        assert!(
            rs.iter().all(|r| r.body == text),
            "{rs:?} should carry {text:?}"
        );
    }

    // What the API lists: the refused numbers failed with the gateway's answer, the others sent
    // with the gateway's id, after as many attempts as the sink saw.
    let mut listed = 0;
    server.for_each_message(&id, None, |m| {
        listed += 1;
        let phone = text(m, "/phone");
        let status = text(m, "/status");
        let attempts = num(m, "/attempts") as usize;
        let mine: Vec<&Received> = received.iter().filter(|r| r.to == phone).collect();
        assert_eq!(attempts, mine.len(), "{phone}: attempts of {m:#}");
        if refused.contains(phone) {
            assert_eq!(status, "failed", "{m:#}");
            let error = m["error"].as_str().unwrap_or("");
            assert!(error.contains("400"), "{phone}: error {error:?}");
        } else {
            assert_eq!(status, "sent", "{m:#}");
            let accepted = mine.iter().find(|r| r.answer.is_accepted()).unwrap();
            let gateway_id = format!("sink-{}", accepted.seq);
            assert_eq!(
                m["provider_message_id"].as_str(),
                Some(gateway_id.as_str()),
                "{m:#}"
            );
        }
    });
    assert_eq!(listed, valid.len(), "one message per valid recipient");
    eprintln!(
        "[{backend:?}] sink: {} requests, {} accepted, {} resent messages",
        report.total,
        report.accepted,
        report.duplicates.len()
    );
}
