//! The opt-out list over HTTP (API.md, "Inbound messages and opt-outs"): added by JSON and by a
//! streamed CSV import, looked up in any form of the number, listed a page at a time, removed;
//! bad input stores nothing; and a listed number gets no message from a batch prepared after it
//! was added, until it is removed. Every scenario on both stores.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{
    Backend, TestDb, TestServer, assert_error, encode, mobile, national, num, text,
};

const SHORT: Duration = Duration::from_secs(120);

on_both_backends!(the_list_takes_json_and_csv_and_gives_them_back
    => the_list_takes_json_and_csv_and_gives_them_back_sqlite,
       the_list_takes_json_and_csv_and_gives_them_back_postgres);
on_both_backends!(bad_input_stores_nothing
    => bad_input_stores_nothing_sqlite,
       bad_input_stores_nothing_postgres);
on_both_backends!(a_listed_number_gets_nothing_until_it_is_removed
    => a_listed_number_gets_nothing_until_it_is_removed_sqlite,
       a_listed_number_gets_nothing_until_it_is_removed_postgres);

on_both_backends!(numbers_that_opt_out_mid_batch_get_nothing_more
    => numbers_that_opt_out_mid_batch_get_nothing_more_sqlite,
       numbers_that_opt_out_mid_batch_get_nothing_more_postgres,
       numbers_that_opt_out_mid_batch_get_nothing_more_rabbitmq);

/// Every number on the list, following `next` with pages of `limit`.
fn whole_list(server: &TestServer, limit: usize) -> Vec<Value> {
    let mut items = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/v1/opt-outs?limit={limit}");
        if let Some(after) = &after {
            path.push_str(&format!("&after={}", encode(after)));
        }
        let (status, page) = server.get_json(&path);
        assert_eq!(status, 200, "{path}: {page}");
        let page_items = page["items"].as_array().unwrap();
        assert!(page_items.len() <= limit, "{page}");
        items.extend(page_items.iter().cloned());
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return items,
        }
    }
}

fn phones_of(items: &[Value]) -> Vec<String> {
    items.iter().map(|i| text(i, "/phone").to_owned()).collect()
}

fn the_list_takes_json_and_csv_and_gives_them_back(backend: Backend) {
    let db = TestDb::new(backend);
    let server = TestServer::start(&db, &[]);
    let (a, b, c, d) = (mobile(1001), mobile(1002), mobile(1003), mobile(1004));

    // JSON: E.164 and national forms, a duplicate, and an entry that is no number.
    let (status, added) = server.post_json(
        "/v1/opt-outs",
        &json!({"phones": [a, national(&b), "not a number", a]}),
    );
    assert_eq!(status, 200, "{added}");
    assert_eq!(added, json!({"added": 2, "already": 1, "invalid": 1}));
    let (status, again) = server.post_json("/v1/opt-outs", &json!({"phones": [b]}));
    assert_eq!(status, 200, "{again}");
    assert_eq!(again, json!({"added": 0, "already": 1, "invalid": 0}));

    // CSV: a `phone` column among others, one number listed already, one row that is no number.
    let csv = format!(
        "name,phone\nCy,{c}\nDi,{}\nEd,12345\nFa,{a}\n",
        national(&d)
    );
    let (status, imported) = server.post_csv("/v1/opt-outs", csv);
    assert_eq!(status, 200, "{imported}");
    assert_eq!(imported, json!({"added": 2, "already": 1, "invalid": 1}));

    // Looked up in any form; the source says how each came.
    let (status, entry) = server.get_json(&format!("/v1/opt-outs/{}", encode(&national(&b))));
    assert_eq!(status, 200, "{entry}");
    assert_eq!(text(&entry, "/phone"), b);
    assert_eq!(text(&entry, "/source"), "api");
    assert!(!text(&entry, "/created_at").is_empty(), "{entry}");
    let (status, entry) = server.get_json(&format!("/v1/opt-outs/{}", encode(&d)));
    assert_eq!((status, text(&entry, "/source")), (200, "csv"), "{entry}");

    // Listed in number order, whatever the page size.
    let expected = vec![a.clone(), b.clone(), c.clone(), d.clone()];
    for limit in [1, 3, 100] {
        assert_eq!(
            phones_of(&whole_list(&server, limit)),
            expected,
            "limit {limit}"
        );
    }

    // Removed once; then it is gone, and removing it again is a 404.
    let path = format!("/v1/opt-outs/{}", encode(&c));
    assert_eq!(server.delete(&path).0, 204);
    assert_error(&server.get_json(&path), 404, "not_found", "after delete");
    assert_error(&server.delete(&path), 404, "not_found", "second delete");
    assert_eq!(phones_of(&whole_list(&server, 100)), vec![a, b, d]);
    // A path that is no number is not on the list either.
    assert_error(
        &server.get_json("/v1/opt-outs/not-a-number"),
        404,
        "not_found",
        "no number",
    );
}

fn bad_input_stores_nothing(backend: Backend) {
    let db = TestDb::new(backend);
    let server = TestServer::start(&db, &[]);

    // A CSV that breaks after valid rows: nothing of it is stored.
    let mut csv = String::from("phone\n");
    for n in 0..2500 {
        csv.push_str(&mobile(2_000 + n));
        csv.push('\n');
    }
    csv.push_str("\"+8613800009999\n");
    let reply = server.post_csv("/v1/opt-outs", csv);
    assert_error(&reply, 400, "bad_csv", "unclosed quote");
    // Without a `phone` column.
    let reply = server.post_csv("/v1/opt-outs", format!("number\n{}\n", mobile(1)));
    assert_error(&reply, 400, "bad_csv", "no phone column");
    // JSON that is not the request.
    let reply = server.post_json("/v1/opt-outs", &json!({"phones": [mobile(1), 7]}));
    assert_error(&reply, 400, "bad_request", "a number that is not a string");
    let reply = server.post_json("/v1/opt-outs", &json!({"phone": [mobile(1)]}));
    assert_error(&reply, 400, "bad_request", "unknown field");
    let reply = server.post_raw("/v1/opt-outs", "text/plain", mobile(1));
    assert_error(&reply, 400, "bad_request", "another content type");
    for query in ["limit=0", "limit=1001", "after=abc", "after=%2B12a"] {
        let reply = server.get_json(&format!("/v1/opt-outs?{query}"));
        assert_error(&reply, 400, "bad_request", query);
    }
    assert!(whole_list(&server, 100).is_empty());
    // The service still serves.
    let (status, added) = server.post_json("/v1/opt-outs", &json!({"phones": [mobile(1)]}));
    assert_eq!((status, num(&added, "/added")), (200, 1), "{added}");
}

fn a_listed_number_gets_nothing_until_it_is_removed(backend: Backend) {
    let db = TestDb::new(backend);
    let server = TestServer::start(&db, &[]);
    let phones: Vec<String> = (0..20).map(|k| mobile(3_000_000 + k * 10)).collect();
    let stopped = [phones[3].clone(), phones[17].clone()];
    let (status, added) = server.post_json("/v1/opt-outs", &json!({"phones": stopped}));
    assert_eq!((status, num(&added, "/added")), (200, 2), "{added}");

    let run = |name: &str, opted_out: u64| -> Vec<String> {
        let recipients: Vec<Value> = phones.iter().map(|p| json!({"phone": p})).collect();
        let id = server.create_batch(&json!({
            "name": name,
            "content": "Hello",
            "recipients": recipients,
        }));
        server.action_ok(&id, "start", "preparing");
        let batch = server.wait_for_state(&id, &["completed"], SHORT);
        let messages = server.all_messages(&id, None);
        assert_eq!(
            num(&batch, "/results/sent"),
            messages.len() as u64,
            "{batch}"
        );
        assert_eq!(num(&batch, "/results/opted_out"), opted_out, "{batch}");
        messages
            .iter()
            .map(|m| text(m, "/phone").to_owned())
            .collect()
    };

    let sent = run("with-two-stopped", 2);
    assert_eq!(sent.len(), phones.len() - 2, "{sent:?}");
    for phone in &stopped {
        assert!(!sent.contains(phone), "{phone} was messaged: {sent:?}");
    }

    let path = format!("/v1/opt-outs/{}", encode(&stopped[0]));
    assert_eq!(server.delete(&path).0, 204);
    let sent = run("with-one-stopped", 1);
    assert_eq!(sent.len(), phones.len() - 1, "{sent:?}");
    assert!(sent.contains(&stopped[0]), "{sent:?}");
    assert!(!sent.contains(&stopped[1]), "{sent:?}");
}

/// Numbers that opt out while their batch runs get nothing more: the batch is paused part way
/// (so that which messages are still unsent is known), every number still waiting is listed,
/// and after the resume each of those messages ends `cancelled` with `error` `opted_out`, with
/// exact counts, while what was sent before stays sent.
fn numbers_that_opt_out_mid_batch_get_nothing_more(backend: Backend) {
    let db = TestDb::new(backend);
    let server = TestServer::start(
        &db,
        &[
            ("SMSBATCH__PROVIDERS__SIMULATOR__LATENCY_MS", "100"),
            ("SMSBATCH__SMSBATCH__WORKER_COUNT", "2"),
            ("SMSBATCH__SMSBATCH__SEND_CONCURRENCY", "4"),
        ],
    );
    let phones: Vec<String> = (0..300).map(|k| mobile(4_000_000 + k * 10)).collect();
    let recipients: Vec<Value> = phones.iter().map(|p| json!({"phone": p})).collect();
    let id = server.create_batch(&json!({
        "name": "stops-mid-batch",
        "content": "Hello",
        "recipients": recipients,
    }));
    server.action_ok(&id, "start", "preparing");
    server.wait_until(&id, "sending (results.sent > 0)", SHORT, |b| {
        num(b, "/results/sent") > 0
    });
    server.action_ok(&id, "pause", "paused");
    // Provider calls in flight finish, and their slices are recorded, before nothing moves.
    let waiting = crate::common::eventually("the paused batch's messages settle", SHORT, || {
        let messages = server.all_messages(&id, None);
        let settled = messages
            .iter()
            .all(|m| matches!(text(m, "/status"), "sent" | "pending"));
        if !settled {
            return Err(format!("{} messages, some still sending", messages.len()));
        }
        Ok(messages
            .iter()
            .filter(|m| text(m, "/status") == "pending")
            .map(|m| text(m, "/phone").to_owned())
            .collect::<Vec<_>>())
    });
    assert!(
        !waiting.is_empty() && waiting.len() < phones.len(),
        "paused part way: {} of {} waiting",
        waiting.len(),
        phones.len()
    );
    let (status, added) = server.post_json("/v1/opt-outs", &json!({"phones": waiting}));
    assert_eq!(status, 200, "{added}");
    assert_eq!(num(&added, "/added"), waiting.len() as u64, "{added}");

    server.action_ok(&id, "resume", "delivering");
    let batch = server.wait_for_state(&id, &["completed"], SHORT);
    let sent = (phones.len() - waiting.len()) as u64;
    assert_eq!(num(&batch, "/results/sent"), sent, "{batch}");
    assert_eq!(
        num(&batch, "/results/cancelled"),
        waiting.len() as u64,
        "{batch}"
    );
    assert_eq!(num(&batch, "/results/failed"), 0, "{batch}");
    for m in server.all_messages(&id, None) {
        let phone = text(&m, "/phone");
        if waiting.iter().any(|w| w == phone) {
            assert_eq!(text(&m, "/status"), "cancelled", "{m}");
            assert_eq!(text(&m, "/error"), "opted_out", "{m}");
            assert_eq!(num(&m, "/attempts"), 0, "not handed to the provider: {m}");
        } else {
            assert_eq!(text(&m, "/status"), "sent", "{m}");
        }
    }
}
