//! The `smpp` provider against a real SMSC (node-smpp's server, `common::smsc`): every message
//! submitted once and recorded with the SMSC's id, the window never exceeded, error statuses
//! failing their messages with the status named, throttling slowing down without losing or
//! repeating anything, long UCS-2 text as concatenated parts that reassemble, and a clean
//! `unbind` when the service stops, an SMSC killed and restarted, an SMSC that stops answering.
//! Each scenario on SQLite and on PostgreSQL with RabbitMQ and two instances sharing the batch
//! (each with its own session); the core one on PostgreSQL alone too.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::smsc::Smsc;
use crate::common::{Backend, TestDb, TestServer, count_by_status, mobile, num, text};

const SHORT: Duration = Duration::from_secs(120);
const WINDOW: u64 = 3;

on_both_backends!(every_message_is_submitted_once_within_the_window
    => every_message_is_submitted_once_within_the_window_sqlite,
       every_message_is_submitted_once_within_the_window_postgres,
       every_message_is_submitted_once_within_the_window_rabbitmq);

pub(crate) fn smsc(extra: Value) -> Smsc {
    let mut config = json!({"system_id": "esme", "password": "s3cret"});
    config
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    Smsc::start(config)
}

pub(crate) fn server(
    db: &TestDb,
    smsc: &Smsc,
    account: &[(&str, &str)],
    env: &[(&str, &str)],
) -> TestServer {
    let mut all = smsc.env("acme", account);
    all.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let all: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestServer::start(db, &all)
}

/// A second instance on the same database and queue, on the production stack (with its own
/// session to the SMSC); none on the embedded store.
pub(crate) fn second(
    db: &TestDb,
    smsc: &Smsc,
    account: &[(&str, &str)],
    env: &[(&str, &str)],
) -> Option<TestServer> {
    (db.backend() == Backend::PostgresRabbitmq).then(|| server(db, smsc, account, env))
}

/// A batch through `acme` of `phones`, each with a `name` var, started.
pub(crate) fn start_batch(server: &TestServer, content: &str, phones: &[String]) -> String {
    let recipients: Vec<Value> = phones
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"phone": p, "vars": {"name": format!("N{i}")}}))
        .collect();
    let id = server.create_batch(&json!({
        "name": "smpp",
        "content": content,
        "provider": "acme",
        "recipients": recipients,
    }));
    server.action_ok(&id, "start", "preparing");
    id
}

/// The SMSC's submits by destination (E.164, with its `+`).
pub(crate) fn by_destination(submits: &[Value]) -> BTreeMap<String, Vec<Value>> {
    let mut map: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for s in submits {
        map.entry(format!("+{}", text(s, "/destination")))
            .or_default()
            .push(s.clone());
    }
    map
}

fn every_message_is_submitted_once_within_the_window(backend: Backend) {
    let smsc = smsc(json!({"response_delay_ms": 30}));
    let db = TestDb::new(backend);
    let window = WINDOW.to_string();
    let account = [("WINDOW", window.as_str())];
    let first = server(&db, &smsc, &account, &[]);
    // Two instances share the batch on the production stack; each binds its own session.
    let second = (backend == Backend::PostgresRabbitmq).then(|| server(&db, &smsc, &account, &[]));
    let phones: Vec<String> = (0..120).map(|i| mobile(7000 + i)).collect();
    let id = start_batch(&first, "Hi {{name}}, your code is ready.", &phones);
    let batch = first.wait_for_state(&id, &["completed"], SHORT);
    assert_eq!(num(&batch, "/results/sent"), 120, "{batch:#}");
    assert_eq!(num(&batch, "/results/failed"), 0, "{batch:#}");

    let accepted = smsc.accepted();
    let seen = by_destination(&accepted);
    assert_eq!(seen.len(), 120, "every number reached the SMSC");
    assert!(
        seen.values().all(|s| s.len() == 1),
        "no number submitted twice: {:?}",
        seen.iter()
            .filter(|(_, s)| s.len() > 1)
            .map(|(p, _)| p)
            .collect::<Vec<_>>()
    );
    let messages = first.all_messages(&id, None);
    assert_eq!(count_by_status(&messages).get("sent"), Some(&120));
    for m in &messages {
        let phone = text(m, "/phone");
        let submit = &seen[phone][0];
        assert_eq!(
            m["provider_message_id"], submit["message_id"],
            "the message keeps the SMSC's id: {m}"
        );
        let index = phones.iter().position(|p| p == phone).unwrap();
        assert_eq!(
            text(submit, "/text"),
            format!("Hi N{index}, your code is ready."),
            "{submit}"
        );
        assert_eq!(
            submit["registered_delivery"], 1,
            "a receipt is asked: {submit}"
        );
        assert_eq!(submit["data_coding"], 0, "GSM-7: {submit}");
        assert_eq!(
            (
                &submit["source"],
                &submit["source_ton"],
                &submit["source_npi"]
            ),
            (&json!("Shop"), &json!(5), &json!(0)),
            "an alphanumeric sender: {submit}"
        );
    }
    let binds = smsc.events_of("bind");
    let sessions = if second.is_some() { 2 } else { 1 };
    assert_eq!(binds.len(), sessions, "one session per instance: {binds:?}");
    let most = accepted.iter().map(|s| num(s, "/in_flight")).max().unwrap();
    assert!(
        most <= WINDOW,
        "at most {WINDOW} unanswered per session, the SMSC saw {most}"
    );
    assert_eq!(
        most, WINDOW,
        "the window is used: the SMSC saw at most {most} in flight"
    );
    drop(second);
}

alone_and_paired!(error_statuses_fail_their_messages_with_the_status_named
    => error_statuses_fail_their_messages_with_the_status_named_sqlite, error_statuses_fail_their_messages_with_the_status_named_paired);

fn error_statuses_fail_their_messages_with_the_status_named(backend: Backend) {
    // Numbers whose digits start 861380000 are refused; the others go.
    let smsc = smsc(json!({"reject_prefix": "861380000"}));
    let db = TestDb::new(backend);
    let server = server(&db, &smsc, &[], &[]);
    let _second = second(&db, &smsc, &[], &[]);
    let refused: Vec<String> = (0..5).map(mobile).collect();
    let taken: Vec<String> = (0..5).map(|i| mobile(50_000_000 + i)).collect();
    let phones: Vec<String> = refused.iter().chain(&taken).cloned().collect();
    let id = start_batch(&server, "Hello {{name}}", &phones);
    let batch = server.wait_for_state(&id, &["completed", "failed"], SHORT);
    assert_eq!(num(&batch, "/results/sent"), 5, "{batch:#}");
    assert_eq!(num(&batch, "/results/failed"), 5, "{batch:#}");
    for m in server.all_messages(&id, None) {
        let phone = text(&m, "/phone");
        if refused.iter().any(|p| p == phone) {
            assert_eq!(m["status"], "failed", "{m}");
            assert_eq!(m["error"], "ESME_RINVDSTADR (0x0000000B)", "{m}");
            assert_eq!(m["attempts"], 1, "a permanent refusal is not retried: {m}");
        } else {
            assert_eq!(m["status"], "sent", "{m}");
        }
    }
    assert_eq!(
        smsc.events_of("submit").len(),
        10,
        "each refused number tried once"
    );
}

alone_and_paired!(throttling_slows_down_and_loses_nothing
    => throttling_slows_down_and_loses_nothing_sqlite, throttling_slows_down_and_loses_nothing_paired);

fn throttling_slows_down_and_loses_nothing(backend: Backend) {
    // Every third submit is refused with ESME_RTHROTTLED. A throttled message is retried after
    // the retry backoff, short here so that the test does not wait seconds per throttle.
    let smsc = smsc(json!({"throttle_every": 3}));
    let db = TestDb::new(backend);
    let env = [
        ("SMSBATCH__SMSBATCH__RETRY_COUNT", "20"),
        ("SMSBATCH__SMSBATCH__RETRY_BACKOFF_MS", "100"),
    ];
    let server = server(&db, &smsc, &[], &env);
    let _second = second(&db, &smsc, &[], &env);
    let phones: Vec<String> = (0..30).map(|i| mobile(8000 + i)).collect();
    let id = start_batch(&server, "Hi {{name}}", &phones);
    let batch = server.wait_for_state(&id, &["completed"], SHORT);
    assert_eq!(num(&batch, "/results/sent"), 30, "{batch:#}");
    let submits = smsc.events_of("submit");
    let throttled = submits.iter().filter(|s| s["status"] == 0x58).count();
    assert!(
        throttled >= 10,
        "the SMSC throttled {throttled} of {}",
        submits.len()
    );
    let accepted = by_destination(&smsc.accepted());
    assert_eq!(accepted.len(), 30);
    assert!(
        accepted.values().all(|s| s.len() == 1),
        "each number accepted once"
    );
    for m in server.all_messages(&id, None) {
        let submit = &accepted[text(&m, "/phone")][0];
        assert_eq!(m["provider_message_id"], submit["message_id"], "{m}");
    }
    // Each retry comes after its backoff (100 ms, doubling), not after the delivery step's
    // 30 s quiet spell: a message throttled twice used to wait for that.
    for (phone, tries) in by_destination(&submits) {
        let mut at: Vec<u64> = tries.iter().map(|s| num(s, "/at")).collect();
        at.sort_unstable();
        let longest = at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        assert!(
            longest < 10_000,
            "{phone} waited {longest} ms between two tries: {tries:#?}"
        );
    }
}

alone_and_paired!(a_long_ucs2_message_goes_as_concatenated_parts_that_reassemble
    => a_long_ucs2_message_goes_as_concatenated_parts_that_reassemble_sqlite, a_long_ucs2_message_goes_as_concatenated_parts_that_reassemble_paired);

fn a_long_ucs2_message_goes_as_concatenated_parts_that_reassemble(backend: Backend) {
    let smsc = smsc(json!({}));
    let db = TestDb::new(backend);
    let server = server(&db, &smsc, &[], &[]);
    let _second = second(&db, &smsc, &[], &[]);
    // 91 characters of Cyrillic and a name: over 70, so two UCS-2 segments.
    let content = "Здравствуйте, {{name}}! Ваш заказ готов к выдаче в пункте самовывоза до конца недели. Спасибо!";
    let phones = vec![mobile(9001), mobile(9002)];
    let id = start_batch(&server, content, &phones);
    server.wait_for_state(&id, &["completed"], SHORT);
    let seen = by_destination(&smsc.accepted());
    let mut references = HashMap::new();
    for m in server.all_messages(&id, None) {
        let phone = text(&m, "/phone");
        let index = phones.iter().position(|p| p == phone).unwrap();
        let rendered = content.replace("{{name}}", &format!("N{index}"));
        assert_eq!(m["segments"], 2, "{m}");
        let parts = &seen[phone];
        assert_eq!(parts.len(), 2, "one submit_sm per segment: {parts:#?}");
        let mut reassembled = String::new();
        for (i, part) in parts.iter().enumerate() {
            assert_eq!(part["data_coding"], 8, "UCS-2: {part}");
            assert_eq!(
                num(part, "/esm_class") & 0x40,
                0x40,
                "a UDH follows: {part}"
            );
            // IEI 0 (concatenation, 8-bit reference), length 3: reference, total, this part.
            let udh = text(part, "/udh");
            assert_eq!(udh.len(), 12, "{part}");
            assert_eq!(&udh[..6], "050003", "{part}");
            assert_eq!(&udh[8..], format!("02{:02x}", i + 1), "{part}");
            references
                .entry(phone.to_owned())
                .or_insert_with(|| udh[6..8].to_owned());
            assert_eq!(
                references[phone],
                udh[6..8],
                "one reference for the parts: {parts:#?}"
            );
            reassembled.push_str(text(part, "/text"));
        }
        assert_eq!(reassembled, rendered);
        assert_eq!(
            m["provider_message_id"], parts[0]["message_id"],
            "the first part's id: {m}"
        );
    }
}

#[test]
fn stopping_the_service_unbinds_its_session() {
    let smsc = smsc(json!({}));
    let db = TestDb::new(Backend::Sqlite);
    let mut server = server(&db, &smsc, &[], &[]);
    smsc.wait_for(SHORT, "a bind", |e| e.iter().any(|e| e["event"] == "bind"));
    let (code, _) = server.terminate();
    assert_eq!(code, Some(0));
    assert_eq!(smsc.events_of("unbind").len(), 1, "{:#?}", smsc.events());
}

/// Every number the SMSC accepted at most once, and what the service recorded agreeing with it:
/// `sent` with the SMSC's id, or `failed` as `unknown_outcome` for a submit whose answer was
/// lost. Returns how many were settled as unknown.
fn nothing_accepted_twice(server: &TestServer, id: &str, smsc: &Smsc, total: usize) -> usize {
    let accepted = by_destination(&smsc.accepted());
    let twice: Vec<&String> = accepted
        .iter()
        .filter(|(_, s)| s.len() > 1)
        .map(|(p, _)| p)
        .collect();
    assert!(twice.is_empty(), "accepted twice by the SMSC: {twice:?}");
    let messages = server.all_messages(id, None);
    assert_eq!(messages.len(), total);
    let mut unknown = 0;
    for m in &messages {
        match text(m, "/status") {
            "sent" => {
                let submit = accepted
                    .get(text(m, "/phone"))
                    .unwrap_or_else(|| panic!("sent, yet the SMSC never took it: {m}"));
                assert_eq!(m["provider_message_id"], submit[0]["message_id"], "{m}");
            }
            "failed" => {
                assert_eq!(m["error"], "unknown_outcome", "{m}");
                unknown += 1;
            }
            other => panic!("a message ended {other}: {m}"),
        }
    }
    unknown
}

alone_and_paired!(the_smsc_killed_mid_batch_and_restarted_sends_nothing_twice
    => the_smsc_killed_mid_batch_and_restarted_sends_nothing_twice_sqlite, the_smsc_killed_mid_batch_and_restarted_sends_nothing_twice_paired);

fn the_smsc_killed_mid_batch_and_restarted_sends_nothing_twice(backend: Backend) {
    let mut smsc = smsc(json!({"response_delay_ms": 100}));
    let db = TestDb::new(backend);
    let account = [("WINDOW", "3"), ("RECONNECT_MS", "200")];
    let env = [("SMSBATCH__SMSBATCH__RETRY_COUNT", "20")];
    let server = server(&db, &smsc, &account, &env);
    let second = second(&db, &smsc, &account, &env);
    let phones: Vec<String> = (0..60).map(|i| mobile(6000 + i)).collect();
    let recipients: Vec<Value> = phones.iter().map(|p| json!({"phone": p})).collect();
    let id = server.create_batch(&json!({
        "name": "smpp", "content": "Your code", "provider": "acme",
        "recipients": recipients, "failure_threshold": 1.0,
    }));
    server.action_ok(&id, "start", "preparing");
    smsc.wait_for(SHORT, "ten submits", |e| {
        e.iter().filter(|e| e["event"] == "submit").count() >= 10
    });
    smsc.restart_after(Duration::from_millis(500));
    let batch = server.wait_for_state(&id, &["completed"], SHORT);
    let unknown = nothing_accepted_twice(&server, &id, &smsc, 60);
    let sessions = if second.is_some() { 2 } else { 1 };
    assert!(
        unknown <= 3 * sessions,
        "at most a window's worth per session lost its answer: {unknown}"
    );
    assert_eq!(
        num(&batch, "/results/sent") as usize + unknown,
        60,
        "{batch:#}"
    );
    assert!(
        smsc.events_of("bind").len() >= 2 * sessions,
        "the session bound again after the restart"
    );
}

alone_and_paired!(an_smsc_that_stops_answering_is_left_and_bound_again
    => an_smsc_that_stops_answering_is_left_and_bound_again_sqlite, an_smsc_that_stops_answering_is_left_and_bound_again_paired);

fn an_smsc_that_stops_answering_is_left_and_bound_again(backend: Backend) {
    // After the 10th submit, that session answers nothing more; a new one answers again.
    let smsc = smsc(json!({"response_delay_ms": 20, "silent_after": 10}));
    let db = TestDb::new(backend);
    let account = [
        ("WINDOW", "4"),
        ("RESPONSE_TIMEOUT_MS", "800"),
        ("RECONNECT_MS", "100"),
    ];
    let server = server(&db, &smsc, &account, &[]);
    let second = second(&db, &smsc, &account, &[]);
    let phones: Vec<String> = (0..40).map(|i| mobile(5000 + i)).collect();
    let recipients: Vec<Value> = phones.iter().map(|p| json!({"phone": p})).collect();
    let id = server.create_batch(&json!({
        "name": "smpp", "content": "Your code", "provider": "acme",
        "recipients": recipients, "failure_threshold": 1.0,
    }));
    server.action_ok(&id, "start", "preparing");
    let batch = server.wait_for_state(&id, &["completed"], SHORT);
    let unknown = nothing_accepted_twice(&server, &id, &smsc, 40);
    assert!(
        (1..=4).contains(&unknown),
        "the submits left unanswered are settled as unknown: {unknown}"
    );
    assert_eq!(num(&batch, "/results/sent") as usize + unknown, 40);
    let sessions = if second.is_some() { 2 } else { 1 };
    assert!(
        smsc.events_of("bind").len() > sessions,
        "a new session took over"
    );
}

#[test]
fn readiness_and_metrics_show_each_session_and_a_refused_bind() {
    let smsc = smsc(json!({}));
    let db = TestDb::new(Backend::Sqlite);
    // `acme` binds; `wrong` gives a password the SMSC refuses.
    let mut env = smsc.env("wrong", &[("PASSWORD", "nope")]);
    env.push(("SMSBATCH__PROVIDERS__SMPP__ACME__BINDS".into(), "2".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = server(&db, &smsc, &[], &env);
    let sessions = |name: &str| {
        let (status, body) = server.get_json("/readyz");
        assert_eq!(
            status, 200,
            "an SMSC never makes the instance unready: {body}"
        );
        body["providers"][name]["sessions"].clone()
    };
    crate::common::eventually("both of acme's sessions bound", SHORT, || {
        let s = sessions("acme");
        let bound = s
            .as_array()
            .is_some_and(|a| a.len() == 2 && a.iter().all(|s| s["state"] == "bound"));
        if bound { Ok(()) } else { Err(s.to_string()) }
    });
    crate::common::eventually("wrong's bind refused", SHORT, || {
        let s = sessions("wrong");
        if s[0]["state"] == "refused" {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    let wrong = sessions("wrong");
    assert_eq!(wrong[0]["reason"], "ESME_RBINDFAIL (0x0000000D)", "{wrong}");
    let metrics = server.get("/metrics").body;
    for line in [
        "smsbatch_smpp_sessions{provider=\"acme\",state=\"bound\"} 2",
        "smsbatch_smpp_sessions{provider=\"wrong\",state=\"refused\"} 1",
        "smsbatch_smpp_window_in_use{provider=\"acme\"} 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in:\n{metrics}"
        );
    }
    assert!(
        smsc.events_of("bind").iter().any(|b| b["ok"] == false),
        "the SMSC refused a bind"
    );
}
