//! What holds for an SMPP account as a whole, against a real SMSC (node-smpp's server,
//! `common::smsc`): its rate limit, counted in segments, held by two instances together (measured
//! at the SMSC), and a bind the SMSC refuses (a wrong password), which leaves the batch waiting
//! with a condition that says why instead of failing its messages, until the account binds.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Backend, TestDb, eventually, mobile, num};
use crate::smpp::{by_destination, server, smsc, start_batch};

const SHORT: Duration = Duration::from_secs(120);

/// The most submits the SMSC took within any second (a sliding window over their times).
fn busiest_second(submits: &[Value]) -> usize {
    let mut at: Vec<u64> = submits.iter().map(|s| num(s, "/at")).collect();
    at.sort_unstable();
    (0..at.len())
        .map(|i| at[i..].iter().take_while(|&&t| t < at[i] + 1000).count())
        .max()
        .unwrap_or(0)
}

#[test]
fn the_accounts_rate_holds_across_two_instances() {
    const RATE: usize = 40;
    let smsc = smsc(json!({"response_delay_ms": 5}));
    let db = TestDb::new(Backend::PostgresRabbitmq);
    let rate = RATE.to_string();
    let account = [("RATE_LIMIT", rate.as_str()), ("WINDOW", "10")];
    // Tasks of twenty messages, so that both instances carry some (a batch that fits in one
    // task goes out as one).
    let tasks = [("SMSBATCH__SMSBATCH__TASK_SIZE", "20")];
    let first = server(&db, &smsc, &account, &tasks);
    let second = server(&db, &smsc, &account, &tasks);
    // 160 numbers, every fourth with a name that makes its message two segments: 200 segments,
    // five seconds of the account's rate (two and a half if each instance held it alone).
    let long = "x".repeat(170);
    let recipients: Vec<Value> = (0..160)
        .map(|i| {
            let name = if i % 4 == 0 {
                long.clone()
            } else {
                format!("N{i}")
            };
            json!({"phone": mobile(9100 + i), "vars": {"name": name}})
        })
        .collect();
    let id = first.create_batch(&json!({
        "name": "rate", "content": "Hi {{name}}", "provider": "acme", "recipients": recipients,
    }));
    first.action_ok(&id, "start", "preparing");
    let batch = first.wait_for_state(&id, &["completed"], SHORT);
    assert_eq!(num(&batch, "/results/sent"), 160, "{batch:#}");
    assert_eq!(num(&batch, "/results/segments"), 200, "{batch:#}");

    let submits = smsc.accepted();
    assert_eq!(submits.len(), 200, "one submit_sm per segment");
    let sessions: BTreeSet<u64> = submits.iter().map(|s| num(s, "/session")).collect();
    assert_eq!(sessions.len(), 2, "both instances sent: {sessions:?}");
    // On average: the budget is shared, so 200 segments take five seconds (less the first
    // window's share), where two instances each holding the rate alone take two and a half.
    let at: Vec<u64> = submits.iter().map(|s| num(s, "/at")).collect();
    let span = at.iter().max().unwrap() - at.iter().min().unwrap();
    assert!(
        span >= 4_500,
        "200 segments at {RATE} a second between both instances take 5 s: {span} ms"
    );
    // Within any second. The limiter grants at most one window's share (4) over the rate in a
    // second (see provider/rate.rs); a segment reaches the SMSC a moment after its grant, so a
    // stall of either process on a busy machine can bunch a few more into one second. Two
    // instances each holding the rate alone sent 159 within one second.
    let busiest = busiest_second(&submits);
    assert!(
        busiest <= RATE + RATE / 2,
        "the SMSC took {busiest} segments within one second from both instances, over \
         the account's {RATE}"
    );
    drop(second);
}

on_both_backends!(a_refused_bind_holds_the_batch_until_the_account_binds
    => a_refused_bind_holds_the_batch_until_the_account_binds_sqlite,
       a_refused_bind_holds_the_batch_until_the_account_binds_postgres,
       a_refused_bind_holds_the_batch_until_the_account_binds_rabbitmq);

/// The batch's condition of `kind`.
fn condition(batch: &Value, kind: &str) -> Value {
    batch["conditions"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["type"] == kind))
        .cloned()
        .unwrap_or(Value::Null)
}

fn a_refused_bind_holds_the_batch_until_the_account_binds(backend: Backend) {
    let mut smsc = smsc(json!({}));
    let db = TestDb::new(backend);
    // The account's password is not the SMSC's.
    let account = [("PASSWORD", "wr0ng"), ("RECONNECT_MS", "200")];
    let first = server(&db, &smsc, &account, &[]);
    let second = (backend == Backend::PostgresRabbitmq).then(|| server(&db, &smsc, &account, &[]));
    let phones: Vec<String> = (0..20).map(|i| mobile(9400 + i)).collect();
    let id = start_batch(&first, "Your code: 5678", &phones);

    let waiting = eventually("the batch waiting for its provider", SHORT, || {
        let batch = first.batch(&id);
        let c = condition(&batch, "ProviderAvailable");
        (batch["state"] == "delivering" && c["status"] == "False")
            .then(|| batch.clone())
            .ok_or(format!("{batch:#}"))
    });
    let c = condition(&waiting, "ProviderAvailable");
    assert_eq!(c["reason"], "BindRefused", "{c}");
    let message = c["message"].as_str().unwrap();
    assert!(
        message.contains("ESME_RBINDFAIL (0x0000000D)") && message.contains("acme"),
        "the condition says why: {message}"
    );
    // A while later it still waits, and no message failed or used an attempt.
    std::thread::sleep(Duration::from_secs(2));
    let batch = first.batch(&id);
    assert_eq!(batch["state"], "delivering", "{batch:#}");
    assert_eq!(num(&batch, "/results/failed"), 0, "{batch:#}");
    assert_eq!(num(&batch, "/results/sent"), 0, "{batch:#}");
    for m in first.all_messages(&id, None) {
        assert_eq!(m["status"], "pending", "{m}");
        assert_eq!(
            m["attempts"], 0,
            "waiting for the provider uses no attempt: {m}"
        );
    }
    assert!(smsc.accepted().is_empty(), "nothing was submitted");
    assert!(
        smsc.events_of("bind").iter().all(|b| b["ok"] == false),
        "every bind was refused"
    );

    // The SMSC's operator gives the account the password the service has.
    smsc.restart_with(Duration::from_millis(100), json!({"password": "wr0ng"}));
    let batch = first.wait_for_state(&id, &["completed"], SHORT);
    assert_eq!(num(&batch, "/results/sent"), 20, "{batch:#}");
    let c = condition(&batch, "ProviderAvailable");
    assert_eq!(
        (&c["status"], &c["reason"]),
        (&json!("True"), &json!("Available")),
        "{c}"
    );
    let accepted = by_destination(&smsc.accepted());
    assert_eq!(accepted.len(), 20);
    assert!(accepted.values().all(|s| s.len() == 1), "each number once");
    for m in first.all_messages(&id, None) {
        assert_eq!(
            (&m["status"], &m["attempts"]),
            (&json!("sent"), &json!(1)),
            "{m}"
        );
    }
    drop(second);
}
