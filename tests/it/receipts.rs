//! Delivery receipts and inbound messages against a real SMSC (node-smpp's server,
//! `common::smsc`) and through the `http` provider's webhooks: every `sent` message settled by
//! its receipt, whichever session or instance it reaches and however early it comes, ids
//! compared across hex and decimal, messages of two parts settled by both, each receipt
//! acknowledged once stored, and an inbound STOP honoured in the batch that is running.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::sink::Sink;
use crate::common::{
    Backend, TestDb, TestServer, count_by_status, encode, eventually, mobile, num, text,
};
use crate::smpp::{by_destination, second, server, smsc, start_batch};

const SHORT: Duration = Duration::from_secs(120);
/// Numbers with these digits after `+86` get an undelivered receipt.
const UNDELIVERABLE: &str = "8613900";

on_both_backends!(receipts_settle_every_message
    => receipts_settle_every_message_sqlite,
       receipts_settle_every_message_postgres,
       receipts_settle_every_message_rabbitmq);

/// Waits until the batch's results say `delivered` and `failed`, with nothing left `sent`.
fn wait_for_receipts(server: &TestServer, id: &str, delivered: u64, failed: u64) -> Value {
    eventually("settled by receipts", SHORT, || {
        let batch = server.batch(id);
        let got = (
            num(&batch, "/results/delivered"),
            num(&batch, "/results/failed"),
            num(&batch, "/results/sent"),
        );
        if got == (delivered, failed, 0) {
            Ok(batch)
        } else {
            Err(format!("{got:?}: {batch:#}"))
        }
    })
}

fn receipts_settle_every_message(backend: Backend) {
    let two = backend == Backend::PostgresRabbitmq;
    // With two instances, each receipt goes on the other instance's session.
    let smsc = smsc(json!({
        "receipts": "text",
        "undeliv_prefix": UNDELIVERABLE,
        "receipts_elsewhere": two,
        "response_delay_ms": 5,
    }));
    let db = TestDb::new(backend);
    // Tasks of ten messages, so that both instances carry some (a batch that fits in one task
    // goes out as one).
    let tasks = [("SMSBATCH__SMSBATCH__TASK_SIZE", "10")];
    let first = server(&db, &smsc, &[], &tasks);
    let second = two.then(|| server(&db, &smsc, &[], &tasks));
    let mut phones: Vec<String> = (0..50).map(|i| mobile(7100 + i)).collect();
    let undeliverable: Vec<String> = (0..10).map(|i| format!("+{UNDELIVERABLE}{i:06}")).collect();
    phones.extend(undeliverable.iter().cloned());
    let id = start_batch(&first, "Hi {{name}}, your code is 1234.", &phones);
    first.wait_for_state(&id, &["completed"], SHORT);
    let batch = wait_for_receipts(&first, &id, 50, 10);
    assert_eq!(batch["state"], "completed", "{batch:#}");
    assert_eq!(num(&batch, "/results/valid"), 60, "{batch:#}");

    let submits = by_destination(&smsc.accepted());
    let messages = first.all_messages(&id, None);
    assert_eq!(
        count_by_status(&messages),
        BTreeMap::from([("delivered".into(), 50), ("failed".into(), 10)])
    );
    for m in &messages {
        let phone = text(m, "/phone");
        assert_eq!(submits[phone].len(), 1, "{phone} submitted once");
        assert_eq!(m["provider_message_id"], submits[phone][0]["message_id"]);
        if undeliverable.iter().any(|p| p == phone) {
            assert_eq!(m["status"], "failed", "{m}");
            assert_eq!(m["error"], "undelivered: UNDELIV err 001", "{m}");
            assert!(m["delivered_at"].is_null(), "{m}");
        } else {
            assert_eq!(m["status"], "delivered", "{m}");
            assert!(m["delivered_at"].is_string(), "{m}");
        }
    }
    // Each receipt was acknowledged as stored, once.
    let acked = smsc.receipts_acked();
    assert_eq!(acked.len(), 60, "{acked:#?}");
    if two {
        let sessions: std::collections::BTreeSet<u64> =
            acked.iter().map(|r| num(r, "/session")).collect();
        assert_eq!(
            sessions.len(),
            2,
            "receipts reached both instances: {sessions:?}"
        );
    }
    let metrics = first.get("/metrics").body;
    assert!(
        metrics.contains("smsbatch_receipt_latency_seconds_count"),
        "{metrics}"
    );
    drop(second);
}

alone_and_paired!(hex_ids_meet_decimal_receipts_sent_at_once
    => hex_ids_meet_decimal_receipts_sent_at_once_sqlite,
       hex_ids_meet_decimal_receipts_sent_at_once_paired);

fn hex_ids_meet_decimal_receipts_sent_at_once(backend: Backend) {
    // The SMSC answers with hex ids and reports, in the same tick, under zero-padded decimal
    // ones, in TLVs: most receipts come before their message's id is committed.
    let smsc = smsc(json!({
        "receipts": "tlv",
        "id_format": "hex",
        "receipt_id_format": "decimal",
        "receipt_id_pad": 10,
    }));
    let db = TestDb::new(backend);
    let account = [("MESSAGE_ID_FORMAT", "hex_decimal")];
    let server = server(&db, &smsc, &account, &[]);
    let _second = second(&db, &smsc, &account, &[]);
    let phones: Vec<String> = (0..60).map(|i| mobile(7300 + i)).collect();
    let id = start_batch(&server, "Your code: 4321", &phones);
    server.wait_for_state(&id, &["completed"], SHORT);
    wait_for_receipts(&server, &id, 60, 0);
    assert_eq!(smsc.receipts_acked().len(), 60);
}

alone_and_paired!(a_two_part_message_is_delivered_once_both_parts_are
    => a_two_part_message_is_delivered_once_both_parts_are_sqlite,
       a_two_part_message_is_delivered_once_both_parts_are_paired);

fn a_two_part_message_is_delivered_once_both_parts_are(backend: Backend) {
    // Receipts a moment after their submit, on the other instance's session when there is one.
    let smsc = smsc(json!({
        "receipts": "text", "receipt_delay_ms": 300, "receipts_elsewhere": true,
    }));
    let db = TestDb::new(backend);
    let server = server(&db, &smsc, &[], &[]);
    let _second = second(&db, &smsc, &[], &[]);
    let long = "Dear {{name}}, ".to_owned() + &"your parcel is on its way. ".repeat(8);
    let phones: Vec<String> = (0..5).map(|i| mobile(7500 + i)).collect();
    let id = start_batch(&server, &long, &phones);
    server.wait_for_state(&id, &["completed"], SHORT);
    wait_for_receipts(&server, &id, 5, 0);
    let submits = by_destination(&smsc.accepted());
    for m in server.all_messages(&id, None) {
        assert_eq!(m["segments"], 2, "{m}");
        let parts = &submits[text(&m, "/phone")];
        assert_eq!(parts.len(), 2, "two parts submitted: {parts:?}");
        assert_eq!(m["provider_message_id"], parts[0]["message_id"], "{m}");
    }
    assert_eq!(smsc.receipts_acked().len(), 10, "a receipt per part");
}

alone_and_paired!(a_stop_mid_batch_is_honoured
    => a_stop_mid_batch_is_honoured_sqlite, a_stop_mid_batch_is_honoured_paired);

fn a_stop_mid_batch_is_honoured(backend: Backend) {
    // One submit at a time per session, slowly: the batch is still running when the STOP comes
    // (on whichever instance's session).
    let smsc = smsc(json!({"response_delay_ms": 100}));
    let db = TestDb::new(backend);
    // Claims of two messages: the opt-out list is looked at as each is claimed.
    let account = [("WINDOW", "1")];
    let env = [("SMSBATCH__SMSBATCH__CLAIM_SIZE", "2")];
    let server = server(&db, &smsc, &account, &env);
    let second = second(&db, &smsc, &account, &env);
    let phones: Vec<String> = (0..30).map(|i| mobile(7700 + i)).collect();
    let stopper = phones.last().unwrap().clone();
    let id = start_batch(&server, "Sale today, {{name}}", &phones);
    smsc.wait_for(SHORT, "a first submit", |events| {
        events.iter().any(|e| e["event"] == "submit")
    });
    // A text that asks for nothing, then the stop word in another case, with blanks.
    smsc.mo(&stopper, "Shop", "hello");
    smsc.mo(&stopper, "Shop", "  Stop ");
    let path = format!("/v1/opt-outs/{}", encode(&stopper));
    let entry = eventually("the sender on the opt-out list", SHORT, || {
        let (status, body) = server.get_json(&path);
        (status == 200).then_some(body).ok_or(format!("{status}"))
    });
    assert_eq!(entry["source"], "inbound", "{entry}");
    let batch = server.wait_for_state(&id, &["completed"], SHORT);
    assert_eq!(num(&batch, "/results/sent"), 29, "{batch:#}");
    assert_eq!(num(&batch, "/results/cancelled"), 1, "{batch:#}");
    let stopped = server
        .all_messages(&id, None)
        .into_iter()
        .find(|m| m["phone"] == stopper.as_str())
        .unwrap();
    assert_eq!(
        (&stopped["status"], &stopped["error"]),
        (&json!("cancelled"), &json!("opted_out")),
        "{stopped}"
    );
    assert!(
        !smsc
            .accepted()
            .iter()
            .any(|s| format!("+{}", text(s, "/destination")) == stopper),
        "nothing went to the number after its STOP"
    );
    let mos = smsc.events_of("mo");
    assert!(mos.iter().all(|m| m["status"] == 0), "{mos:?}");
    // START opts back in.
    smsc.mo(&stopper, "Shop", "START");
    eventually("the sender off the list", SHORT, || {
        let (status, _) = server.get_json(&path);
        (status == 404).then_some(()).ok_or(format!("{status}"))
    });
    // Counted once, by whichever instance's session the message came on.
    let instances: Vec<&TestServer> = std::iter::once(&server).chain(second.as_ref()).collect();
    for action in ["stop", "start", "none"] {
        let series =
            format!("smsbatch_inbound_messages_total{{action=\"{action}\",provider=\"acme\"}}");
        let total: f64 = instances
            .iter()
            .map(|s| crate::common::metric(&s.get("/metrics").body, &series))
            .sum();
        assert_eq!(total, 1.0, "{series}");
    }
}

/// `POST path` with `token` as the bearer token.
fn post_as(server: &TestServer, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent
        .post(format!("{}{path}", server.base_url()))
        .content_type("application/json");
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = request.send(body).unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn the_receipts_webhook_takes_its_token_only() {
    let sink = Sink::start();
    let db = TestDb::new(Backend::Sqlite);
    let url = sink.url();
    let server = TestServer::start(
        &db,
        &[
            ("SMSBATCH__PROVIDERS__HTTP__GW__URL", url.as_str()),
            ("SMSBATCH__PROVIDERS__HTTP__GW__WEBHOOK_TOKEN", "gw-hook"),
            ("SMSBATCH__PROVIDERS__HTTP__PLAIN__URL", url.as_str()),
            ("SMSBATCH__ADMIN__TOKEN", "admin-t0ken"),
        ],
    );
    let receipts = "/v1/providers/gw/receipts";
    // Wrong, missing, the admin's, another provider's unset token, an unknown provider: 401,
    // and nothing of the body is read.
    for (path, token) in [
        (receipts, Some("nope")),
        (receipts, None),
        (receipts, Some("admin-t0ken")),
        ("/v1/providers/plain/receipts", Some("gw-hook")),
        ("/v1/providers/nobody/receipts", Some("gw-hook")),
        ("/v1/providers/gw/inbound", Some("admin-t0ken")),
    ] {
        let reply = post_as(&server, path, token, "{");
        crate::common::assert_error(&reply, 401, "unauthorized", path);
    }
    let reply = post_as(&server, receipts, Some("gw-hook"), "{\"id\": 5}");
    crate::common::assert_error(&reply, 400, "bad_request", "a bad body");

    let admin =
        |path: &str, body: &Value| post_as(&server, path, Some("admin-t0ken"), &body.to_string());
    let phones: Vec<String> = (0..4).map(|i| mobile(7900 + i)).collect();
    let recipients: Vec<Value> = phones.iter().map(|p| json!({"phone": p})).collect();
    let (status, batch) = admin(
        "/v1/batches",
        &json!({"name": "gw", "content": "Hi", "provider": "gw", "recipients": recipients}),
    );
    assert_eq!(status, 201, "{batch}");
    let id = text(&batch, "/id").to_owned();
    let (status, started) = admin(&format!("/v1/batches/{id}/start"), &json!({}));
    assert_eq!(status, 202, "{started}");
    let ids: Vec<String> = eventually("every message sent", SHORT, || {
        let received = sink.received();
        (received.len() == 4)
            .then(|| (0..4).map(|i| format!("sink-{i}")).collect())
            .ok_or(format!("{}", received.len()))
    });
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let get = |path: &str| -> Value {
        agent
            .get(format!("{}{path}", server.base_url()))
            .header("Authorization", "Bearer admin-t0ken")
            .call()
            .map_err(|e| e.to_string())
            .and_then(|mut r| r.body_mut().read_json().map_err(|e| e.to_string()))
            .unwrap_or(Value::Null)
    };
    eventually("every message recorded sent", SHORT, || {
        let batch = get(&format!("/v1/batches/{id}"));
        (num(&batch, "/results/sent") == 4)
            .then_some(())
            .ok_or(format!("{batch:#}"))
    });
    // Well-formed receipts and a STOP, under a token that is not the webhook's: 401, and nothing
    // is stored.
    let all_delivered: Value = ids
        .iter()
        .map(|i| json!({"id": i, "status": "delivered"}))
        .collect();
    let stop = json!({"from": phones[1], "to": "Shop", "text": "STOP"});
    for (path, body) in [
        (receipts, all_delivered.to_string()),
        ("/v1/providers/gw/inbound", stop.to_string()),
    ] {
        for token in [None, Some("admin-t0ken"), Some("gw-hook-not")] {
            let reply = post_as(&server, path, token, &body);
            crate::common::assert_error(&reply, 401, "unauthorized", path);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let batch = get(&format!("/v1/batches/{id}"));
    assert_eq!(
        (
            num(&batch, "/results/sent"),
            num(&batch, "/results/delivered")
        ),
        (4, 0),
        "no receipt was stored: {batch:#}"
    );
    let listed = agent
        .get(format!(
            "{}/v1/opt-outs/{}",
            server.base_url(),
            encode(&phones[1])
        ))
        .header("Authorization", "Bearer admin-t0ken")
        .call();
    assert!(
        matches!(listed, Err(ureq::Error::StatusCode(404))),
        "the STOP was not taken: {listed:?}"
    );

    // One alone (its id in another case), then an array.
    let one = json!({"id": ids[0].to_uppercase(), "status": "delivered"});
    let (status, body) = post_as(&server, receipts, Some("gw-hook"), &one.to_string());
    assert_eq!(status, 204, "{body}");
    let many = json!([
        {"id": ids[1], "status": "delivered"},
        {"id": ids[2], "status": "expired", "error": "validity ran out"},
        {"id": ids[3], "status": "rejected"},
    ]);
    let (status, body) = post_as(&server, receipts, Some("gw-hook"), &many.to_string());
    assert_eq!(status, 204, "{body}");

    let batch: Value = eventually("settled by the webhook", SHORT, || {
        let batch: Value = agent
            .get(format!("{}/v1/batches/{id}", server.base_url()))
            .header("Authorization", "Bearer admin-t0ken")
            .call()
            .map_err(|e| e.to_string())?
            .body_mut()
            .read_json()
            .map_err(|e| e.to_string())?;
        let got = (
            num(&batch, "/results/delivered"),
            num(&batch, "/results/failed"),
        );
        (got == (2, 2))
            .then_some(batch.clone())
            .ok_or(format!("{batch:#}"))
    });
    assert_eq!(num(&batch, "/results/sent"), 0, "{batch:#}");
    let page: Value = agent
        .get(format!("{}/v1/batches/{id}/messages", server.base_url()))
        .header("Authorization", "Bearer admin-t0ken")
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    let errors: BTreeMap<String, Value> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                text(m, "/provider_message_id").to_owned(),
                m["error"].clone(),
            )
        })
        .collect();
    assert_eq!(errors[&ids[0]], Value::Null);
    assert_eq!(errors[&ids[2]], "expired: validity ran out");
    assert_eq!(errors[&ids[3]], "rejected");

    // Inbound through the webhook: STOP lists the sender.
    let stop = json!({"from": phones[0], "to": "Shop", "text": "stop"});
    let (status, body) = post_as(
        &server,
        "/v1/providers/gw/inbound",
        Some("gw-hook"),
        &stop.to_string(),
    );
    assert_eq!(status, 204, "{body}");
    let listed: Value = agent
        .get(format!(
            "{}/v1/opt-outs/{}",
            server.base_url(),
            encode(&phones[0])
        ))
        .header("Authorization", "Bearer admin-t0ken")
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    assert_eq!(listed["source"], "inbound", "{listed}");
    let bad = json!({"from": "not a number", "to": "Shop", "text": "stop"});
    let reply = post_as(
        &server,
        "/v1/providers/gw/inbound",
        Some("gw-hook"),
        &bad.to_string(),
    );
    crate::common::assert_error(&reply, 422, "invalid", "a sender that is no number");
}
