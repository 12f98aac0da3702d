//! The messages export against the real server (docs/api.md, "Messages export"):
//! `GET /v1/batches/{id}/messages` with `Accept: text/csv` answers every message of the batch
//! (over several of the server's pages) as CSV with the documented header, quoting what must be
//! quoted, with the same `status` filter as the JSON listing and the same values; an unknown
//! batch or status is the API's JSON error, and the token guards it. On both stores.
#![allow(clippy::unwrap_used)]

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::sink::Sink;
use crate::common::{Backend, TestDb, TestServer, mobile};

const DEADLINE: Duration = Duration::from_secs(180);
/// The documented header.
pub const HEADER: &str =
    "phone,status,segments,attempts,provider_message_id,error,updated_at,delivered_at";
/// What the sink answers as every message's gateway id: a comma and quotes, which must be
/// quoted in the CSV.
const GATEWAY_ID: &str = "gw-1, \"x\"";

on_both_backends!(the_export_is_every_message_as_csv
    => the_export_is_every_message_as_csv_sqlite,
       the_export_is_every_message_as_csv_postgres);

/// Parses RFC 4180 CSV (quoted fields with doubled quotes and line breaks; `\n` line ends):
/// the rows as fields.
pub fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(!quoted, "the CSV ends inside a quoted field");
    assert!(
        field.is_empty() && row.is_empty(),
        "the CSV's last line ends with a line break"
    );
    rows
}

/// `GET path` with `Accept: accept` (and a bearer token, if given): status, content type, body.
pub fn get_with(
    base: &str,
    path: &str,
    accept: &str,
    token: Option<&str>,
) -> (u16, String, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let mut request = agent.get(format!("{base}{path}")).header("Accept", accept);
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = request.call().unwrap();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_to_string()
        .unwrap();
    (status, content_type, body)
}

/// A message of the JSON listing as the CSV must write it.
fn as_row(m: &Value) -> Vec<String> {
    let text = |k: &str| m[k].as_str().unwrap_or("").to_owned();
    vec![
        text("phone"),
        text("status"),
        m["segments"].to_string(),
        m["attempts"].to_string(),
        text("provider_message_id"),
        text("error"),
        text("updated_at"),
        text("delivered_at"),
    ]
}

/// The export's rows after its header, which it checks.
fn export_rows(server: &TestServer, id: &str, query: &str) -> Vec<Vec<String>> {
    let path = format!("/v1/batches/{id}/messages{query}");
    let (status, content_type, body) = get_with(server.base_url(), &path, "text/csv", None);
    assert_eq!(status, 200, "GET {path}: {body}");
    assert!(content_type.starts_with("text/csv"), "{content_type}");
    let mut rows = parse_csv(&body);
    assert!(!rows.is_empty(), "GET {path}: no header");
    assert_eq!(rows.remove(0).join(","), HEADER, "GET {path}: the header");
    rows
}

fn the_export_is_every_message_as_csv(backend: Backend) {
    let sink = Sink::start();
    sink.accept_with(200, Some(&json!({ "id": GATEWAY_ID }).to_string()));
    sink.refuse_ending(&["0001"], 400);
    let db = TestDb::new(backend);
    let url = sink.url();
    let server = TestServer::start(
        &db,
        &[("SMSBATCH__PROVIDERS__HTTP__SINK__URL", url.as_str())],
    );

    // 2,500 recipients, so the export spans several of the server's pages; every tenth number
    // ends 0001 and is refused, the others are accepted with the gateway's id.
    let id = server.create_batch(&json!({
        "name": "export", "content": "Hi {{name}}", "provider": "sink", "failure_threshold": 1,
    }));
    let mut csv = String::from("phone,name\n");
    for i in 0..2_500u64 {
        let last = if i % 10 == 0 { 1 } else { 7 };
        let _ = writeln!(csv, "{},N{i}", mobile(i * 10_000 + last));
    }
    assert_eq!(server.upload_csv(&id, csv).0, 200);
    server.action_ok(&id, "start", "preparing");
    let batch = server.wait_for_state(&id, &["completed"], DEADLINE);
    assert_eq!(batch["results"]["failed"], 250, "{batch:#}");

    // Every message, in the listing's order, with the listing's values.
    let listed: Vec<Vec<String>> = server.all_messages(&id, None).iter().map(as_row).collect();
    assert_eq!(listed.len(), 2_500);
    let rows = export_rows(&server, &id, "");
    assert_eq!(rows.len(), listed.len(), "one row per message");
    assert_eq!(rows, listed);
    let sent = rows.iter().find(|r| r[1] == "sent").unwrap();
    assert_eq!(sent[4], GATEWAY_ID, "the gateway id reads back whole");

    // The raw text quotes the gateway id, doubling its quotes.
    let (_, _, raw) = get_with(
        server.base_url(),
        &format!("/v1/batches/{id}/messages?status=sent"),
        "text/csv",
        None,
    );
    assert!(raw.contains(",\"gw-1, \"\"x\"\"\","), "{}", &raw[..300]);

    // The status filter: exactly the failed ones, and none of another status.
    let failed: Vec<Vec<String>> = server
        .all_messages(&id, Some("failed"))
        .iter()
        .map(as_row)
        .collect();
    let rows = export_rows(&server, &id, "?status=failed");
    assert_eq!(rows.len(), 250);
    assert_eq!(rows, failed);
    assert!(
        rows.iter()
            .all(|r| r[0].ends_with("0001") && r[1] == "failed")
    );
    assert!(export_rows(&server, &id, "?status=cancelled").is_empty());

    // A batch without messages: the header alone.
    let empty = server.create_batch(&json!({"name": "empty", "content": "Hi"}));
    assert!(export_rows(&server, &empty, "").is_empty());

    // Errors are the API's JSON, whatever was asked for.
    for (path, status, code) in [
        (
            format!("/v1/batches/{}/messages", uuid::Uuid::now_v7()),
            404,
            "not_found",
        ),
        (
            "/v1/batches/not-a-batch/messages".to_owned(),
            404,
            "not_found",
        ),
        (
            format!("/v1/batches/{id}/messages?status=lost"),
            400,
            "bad_request",
        ),
    ] {
        let (got, content_type, body) = get_with(server.base_url(), &path, "text/csv", None);
        assert_eq!(got, status, "GET {path}: {body}");
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
    }

    // Without `Accept: text/csv` the listing stays JSON.
    let (status, content_type, _) = get_with(
        server.base_url(),
        &format!("/v1/batches/{id}/messages?limit=5"),
        "application/json, text/csv;q=0.5",
        None,
    );
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
}

/// With `admin.token` set, the export (and resend) need it: without it 401 and no CSV.
#[test]
fn the_export_needs_the_token() {
    let db = TestDb::new(Backend::Sqlite);
    let token = format!("tok-{}", uuid::Uuid::now_v7().simple());
    let server = TestServer::start(&db, &[("SMSBATCH__ADMIN__TOKEN", &token)]);
    let base = server.base_url();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut created = agent
        .post(format!("{base}/v1/batches"))
        .header("Authorization", format!("Bearer {token}"))
        .send_json(json!({"name": "guarded", "content": "Hi",
                          "recipients": [{"phone": mobile(5)}]}))
        .unwrap();
    assert_eq!(created.status(), 201);
    let batch: Value = created.body_mut().read_json().unwrap();
    let id = batch["id"].as_str().unwrap();
    let path = format!("/v1/batches/{id}/messages");

    for wrong in [None, Some("wrong")] {
        let (status, _, body) = get_with(base, &path, "text/csv", wrong);
        assert_eq!(status, 401, "{body}");
        assert!(!body.contains("phone,"), "no CSV without the token: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let resend = agent
        .post(format!("{base}/v1/batches/{id}/resend"))
        .send_json(json!({"statuses": ["failed"]}))
        .unwrap();
    assert_eq!(resend.status(), 401);

    let (status, _, body) = get_with(base, &path, "text/csv", Some(&token));
    assert_eq!(
        (status, body.trim_end()),
        (200, HEADER),
        "initial: no messages yet"
    );
}
