//! Access to the admin API against the real server: with `admin.token` set, every `/v1/` route
//! needs `Authorization: Bearer <token>`, a missing or wrong one is 401 with API.md's error body
//! and does nothing; the probes, `/metrics` and `/openapi.json` stay open, and the OpenAPI
//! document lists what API.md promises. Secrets never reach the logs: neither the token
//! (whatever the requests carry, at log level trace) nor the password of a database or broker
//! URL (when it is reached, and when it is not).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Backend, TestDb, TestServer, assert_error, num};

/// A deadline that only stops a stuck test.
const DEADLINE: Duration = Duration::from_secs(120);

/// A request body: content type and text.
type Body<'a> = Option<(&'a str, &'a str)>;

/// One request with an optional `Authorization` value; returns the status, the
/// `WWW-Authenticate` header and the body as JSON (Null when empty or not JSON).
fn call(
    base: &str,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: Body<'_>,
) -> (u16, String, Value) {
    let headers: Vec<(&str, &str)> = authorization
        .map(|a| ("Authorization", a))
        .into_iter()
        .collect();
    let (status, headers, text) = send(base, method, path, &headers, body);
    let challenge = header(&headers, "www-authenticate")
        .unwrap_or("")
        .to_owned();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, challenge, json)
}

#[test]
fn the_token_guards_every_v1_route_and_nothing_else() {
    let db = TestDb::new(Backend::Sqlite);
    let token = format!("tok-{}", uuid::Uuid::now_v7().simple());
    let server = TestServer::start(&db, &[("SMSBATCH__ADMIN__TOKEN", &token)]);
    let base = server.base_url();
    let right = format!("Bearer {token}");

    // A batch made with the right token, to aim the refused requests at.
    let create = json!({"name": "guarded", "content": "Hi {{name}}",
                        "recipients": [{"phone": "+8613800001234", "vars": {"name": "Ann"}}]})
    .to_string();
    let (status, _, batch) = call(
        base,
        "POST",
        "/v1/batches",
        Some(&right),
        Some(("application/json", &create)),
    );
    assert_eq!(status, 201, "{batch:#}");
    let id = batch["id"].as_str().unwrap().to_owned();

    let wrong_tokens = [
        None,
        Some(String::new()),
        Some("Bearer".to_owned()),
        Some("Bearer ".to_owned()),
        Some("Bearer wrong".to_owned()),
        Some(format!("Bearer {}", &token[..token.len() - 1])),
        Some(format!("Bearer {token}x")),
        Some(format!("Basic {token}")),
        Some(token.clone()),
    ];
    let csv = "phone\n+8613800001235\n";
    let phones = json!({"phones": ["+8613800001236"]}).to_string();
    // A number on the opt-out list, for the refused lookups and removals to aim at.
    let (status, _, added) = call(
        base,
        "POST",
        "/v1/opt-outs",
        Some(&right),
        Some(("application/json", &phones)),
    );
    assert_eq!(status, 200, "{added:#}");
    let listed = "/v1/opt-outs/%2B8613800001236".to_owned();
    let routes: Vec<(&str, String, Body<'_>)> = vec![
        ("GET", "/v1/batches".into(), None),
        (
            "POST",
            "/v1/batches".into(),
            Some(("application/json", create.as_str())),
        ),
        ("GET", format!("/v1/batches/{id}"), None),
        (
            "POST",
            format!("/v1/batches/{id}/recipients"),
            Some(("text/csv", csv)),
        ),
        ("GET", format!("/v1/batches/{id}/messages"), None),
        ("POST", format!("/v1/batches/{id}/start"), None),
        ("POST", format!("/v1/batches/{id}/pause"), None),
        ("POST", format!("/v1/batches/{id}/resume"), None),
        ("POST", format!("/v1/batches/{id}/cancel"), None),
        ("POST", format!("/v1/batches/{id}/retry"), None),
        (
            "POST",
            format!("/v1/batches/{id}/resend"),
            Some(("application/json", r#"{"statuses": ["failed"]}"#)),
        ),
        ("GET", "/v1/opt-outs".into(), None),
        (
            "POST",
            "/v1/opt-outs".into(),
            Some(("application/json", r#"{"phones": ["+8613800001237"]}"#)),
        ),
        ("POST", "/v1/opt-outs".into(), Some(("text/csv", csv))),
        ("GET", listed.clone(), None),
        ("DELETE", listed.clone(), None),
        // Unknown routes under /v1/ do not tell what exists.
        ("GET", "/v1/secrets".into(), None),
        ("GET", format!("/v1/batches/{}", uuid::Uuid::now_v7()), None),
    ];
    for (method, path, body) in &routes {
        for auth in &wrong_tokens {
            let context = format!("{method} {path} with Authorization {auth:?}");
            let (status, challenge, reply) = call(base, method, path, auth.as_deref(), *body);
            assert_error(&(status, reply), 401, "unauthorized", &context);
            assert_eq!(challenge, "Bearer", "{context}: WWW-Authenticate");
        }
    }

    // Nothing was done: one batch, still initial, with its one recipient.
    let (status, _, page) = call(base, "GET", "/v1/batches", Some(&right), None);
    assert_eq!(status, 200, "{page:#}");
    let items = page["items"].as_array().unwrap();
    assert_eq!(
        items.len(),
        1,
        "refused creations created nothing: {page:#}"
    );
    assert_eq!(items[0]["state"], "initial", "refused actions did nothing");
    assert_eq!(
        num(&items[0], "/results/recipients"),
        1,
        "refused upload stored nothing"
    );

    let (status, _, list) = call(base, "GET", "/v1/opt-outs", Some(&right), None);
    assert_eq!(status, 200, "{list:#}");
    let listed: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["phone"].as_str())
        .collect();
    assert_eq!(
        listed,
        ["+8613800001236"],
        "refused additions and removals changed nothing"
    );

    // The probes, the metrics and the document never need the token.
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let (status, _, _) = call(base, "GET", path, None, None);
        assert_eq!(status, 200, "GET {path} without a token");
    }

    // The right token works everywhere, whatever the letter case of the scheme.
    let lower = format!("bearer {token}");
    let (status, _, reply) = call(
        base,
        "POST",
        &format!("/v1/batches/{id}/recipients"),
        Some(&lower),
        Some(("text/csv", csv)),
    );
    assert_eq!(status, 200, "{reply:#}");
    assert_eq!(num(&reply, "/total"), 2);
    let (status, _, reply) = call(
        base,
        "GET",
        &format!("/v1/batches/{id}/messages"),
        Some(&right),
        None,
    );
    assert_eq!(status, 200, "{reply:#}");
    let (status, _, reply) = call(
        base,
        "POST",
        &format!("/v1/batches/{id}/start"),
        Some(&right),
        None,
    );
    assert_eq!(
        (status, &reply["state"]),
        (202, &json!("preparing")),
        "{reply:#}"
    );
}

/// The server as a child process with all of its output kept, for the log assertions.
struct Logged {
    child: Child,
    output: Arc<Mutex<String>>,
    base: Option<String>,
}

impl Logged {
    fn start(env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_smsbatch"));
        cmd.arg("serve")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("RUST_LOG")
            .env("SMSBATCH__HTTP__BIND", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn smsbatch");
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for (reader, tx) in [
            (
                Box::new(stdout) as Box<dyn std::io::Read + Send>,
                tx.clone(),
            ),
            (Box::new(stderr), tx),
        ] {
            let output = Arc::clone(&output);
            thread::spawn(move || {
                let mut reader = BufReader::new(reader);
                let mut line = Vec::new();
                while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                    let text = String::from_utf8_lossy(&line).into_owned();
                    if let Some(rest) = text.split("smsbatch listening on ").nth(1) {
                        let _ = tx.send(Some(rest.trim().to_owned()));
                    }
                    output.lock().unwrap().push_str(&text);
                    line.clear();
                }
                let _ = tx.send(None);
            });
        }
        // The listening line, or both streams closed (the process stopped).
        let mut base = None;
        let mut closed = 0;
        while base.is_none() && closed < 2 {
            match rx.recv_timeout(DEADLINE) {
                Ok(Some(url)) => base = Some(url),
                Ok(None) => closed += 1,
                Err(_) => panic!("smsbatch neither listened nor stopped"),
            }
        }
        Logged {
            child,
            output,
            base,
        }
    }

    fn base(&self) -> &str {
        self.base
            .as_deref()
            .unwrap_or_else(|| panic!("not listening:\n{}", self.output()))
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// SIGTERM, then waits for the exit and for the last output lines.
    fn stop(&mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        thread::sleep(Duration::from_millis(300));
        self.output()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fails showing the lines that contain `secret`.
fn assert_absent(output: &str, secret: &str, what: &str) {
    let lines: Vec<&str> = output.lines().filter(|l| l.contains(secret)).collect();
    assert!(
        lines.is_empty(),
        "{what} appears in the output:\n{}",
        lines.join("\n")
    );
}

#[test]
fn secrets_never_reach_the_logs() {
    let db = TestDb::new(Backend::Postgres);
    let token = format!("tok-{}", uuid::Uuid::now_v7().simple());
    let password = format!("pw-{}", uuid::Uuid::now_v7().simple());
    // The local server trusts the connection, so the password is carried but never checked.
    let url = db.url().replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{password}@"),
        1,
    );
    assert_ne!(url, db.url(), "the test database URL names user postgres");
    let mut server = Logged::start(&[
        ("SMSBATCH__DATABASE__URL", &url),
        ("SMSBATCH__ADMIN__TOKEN", &token),
        ("SMSBATCH__LOG__LEVEL", "trace"),
        ("SMSBATCH__LOG__FORMAT", "json"),
    ]);
    let base = server.base().to_owned();
    let right = format!("Bearer {token}");

    // Requests with the right token, and with wrong ones that contain it.
    let create = json!({"name": "logs", "content": "Hi {{name}}",
                        "recipients": [{"phone": "+8613800001234", "vars": {"name": "Ann"}},
                                       {"phone": "+8613800000001", "vars": {"name": "Bo"}}]})
    .to_string();
    let (status, _, batch) = call(
        &base,
        "POST",
        "/v1/batches",
        Some(&right),
        Some(("application/json", &create)),
    );
    assert_eq!(status, 201, "{batch:#}");
    let id = batch["id"].as_str().unwrap().to_owned();
    for wrong in [
        format!("Bearer {token}x"),
        format!("Basic {token}"),
        token.clone(),
    ] {
        let (status, _, _) = call(&base, "GET", "/v1/batches", Some(&wrong), None);
        assert_eq!(status, 401);
    }
    let (status, _, _) = call(
        &base,
        "POST",
        &format!("/v1/batches/{id}/start"),
        Some(&right),
        None,
    );
    assert_eq!(status, 202);
    crate::common::eventually("completed", DEADLINE, || {
        let (_, _, b) = call(
            &base,
            "GET",
            &format!("/v1/batches/{id}"),
            Some(&right),
            None,
        );
        if b["state"] == "completed" {
            Ok(())
        } else {
            Err(b.to_string())
        }
    });
    let output = server.stop();

    // The logs were written at trace level, and the database URL was logged redacted.
    assert!(
        output.contains("TRACE") || output.contains("\"level\":\"TRACE\""),
        "trace-level output was captured:\n{output}"
    );
    assert!(
        output.contains("postgres://postgres:***@"),
        "the database URL is logged with its password replaced:\n{output}"
    );
    assert_absent(&output, &token, "the admin token");
    assert_absent(&output, &password, "the database password");
}

#[test]
fn an_unreachable_database_does_not_log_its_password() {
    let password = format!("pw-{}", uuid::Uuid::now_v7().simple());
    let mut server = Logged::start(&[
        (
            "SMSBATCH__DATABASE__URL",
            &format!("postgres://app:{password}@127.0.0.1:1/smsbatch"),
        ),
        ("SMSBATCH__LOG__LEVEL", "trace"),
    ]);
    assert!(server.base.is_none(), "no database, no service");
    let output = server.stop();
    assert!(!output.trim().is_empty(), "it says why it stopped");
    assert_absent(&output, &password, "the database password");
}

/// `(method, path)` of every operation a contract file names (`` `GET /v1/batches?…` `` and the
/// like) before the heading `until`, queries dropped; `None` when the file is not there.
fn named_operations(file: &str, until: &str) -> Option<Vec<(String, String)>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(path).ok()?;
    // What follows `until` is the contract of work under way (SMPP, receipts, opt-outs, the
    // dashboard): its routes join the fixed list below as each of them lands.
    let text = text.split(until).next().unwrap_or(&text);
    let mut ops = Vec::new();
    for quoted in text.split('`').skip(1).step_by(2) {
        let mut words = quoted.split_whitespace();
        if let (Some(method @ ("GET" | "POST")), Some(target), None) =
            (words.next(), words.next(), words.next())
            && target.starts_with('/')
        {
            let path = target.split('?').next().unwrap_or(target);
            ops.push((method.to_lowercase(), path.to_owned()));
        }
    }
    ops.sort();
    ops.dedup();
    Some(ops)
}

/// The OpenAPI document is served open, is OpenAPI 3, and has every operation of API.md with
/// its status codes, the states and the error body.
#[test]
fn the_openapi_document_matches_api_md() {
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(&db, &[("SMSBATCH__ADMIN__TOKEN", "t")]);
    let reply = server.get("/openapi.json");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.content_type.starts_with("application/json"));
    let doc: Value = serde_json::from_str(&reply.body).expect("the document is JSON");
    let version = doc["openapi"].as_str().unwrap_or("");
    assert!(version.starts_with("3."), "OpenAPI 3.x, got {version:?}");

    // The operations the references name, and the fixed list below.
    let mut expected: Vec<(String, String)> = [
        ("post", "/v1/batches"),
        ("get", "/v1/batches"),
        ("get", "/v1/batches/{id}"),
        ("post", "/v1/batches/{id}/recipients"),
        ("get", "/v1/batches/{id}/messages"),
        ("post", "/v1/batches/{id}/start"),
        ("post", "/v1/batches/{id}/pause"),
        ("post", "/v1/batches/{id}/resume"),
        ("post", "/v1/batches/{id}/cancel"),
        ("post", "/v1/batches/{id}/retry"),
        ("get", "/v1/opt-outs"),
        ("post", "/v1/opt-outs"),
        ("get", "/v1/opt-outs/{phone}"),
        ("delete", "/v1/opt-outs/{phone}"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
    ]
    .iter()
    .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
    .collect();
    // The repository's reference (docs/api.md, up to its planned part) always; the contract
    // beside the repository (../shared/API.md, up to its second round) when it is there.
    let from_docs =
        named_operations("docs/api.md", "\n## Part 2").expect("docs/api.md is in the repository");
    assert!(
        from_docs.len() >= 10,
        "docs/api.md names its operations: {from_docs:?}"
    );
    expected.extend(from_docs);
    if let Some(from_api_md) =
        named_operations("../shared/API.md", "\n## Added in the second round")
    {
        assert!(
            from_api_md.len() >= 10,
            "API.md names its operations: {from_api_md:?}"
        );
        expected.extend(from_api_md);
    }
    for (method, path) in &expected {
        assert!(
            doc["paths"][path][method].is_object(),
            "the document has {method} {path}"
        );
    }

    let statuses = |method: &str, path: &str| -> Vec<String> {
        let mut codes: Vec<String> = doc["paths"][path][method]["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path} has responses"))
            .keys()
            .cloned()
            .collect();
        codes.sort();
        codes
    };
    let has = |method: &str, path: &str, wanted: &[&str]| {
        let codes = statuses(method, path);
        for code in wanted {
            assert!(
                codes.iter().any(|c| c == code),
                "{method} {path}: {code} in {codes:?}"
            );
        }
    };
    has("post", "/v1/batches", &["201", "400", "401", "413", "422"]);
    has("get", "/v1/batches", &["200", "400", "401"]);
    has("get", "/v1/batches/{id}", &["200", "401", "404"]);
    has(
        "post",
        "/v1/batches/{id}/recipients",
        &["200", "400", "401", "404", "409", "413"],
    );
    has(
        "get",
        "/v1/batches/{id}/messages",
        &["200", "400", "401", "404"],
    );
    for action in ["start", "pause", "resume", "cancel", "retry"] {
        has(
            "post",
            &format!("/v1/batches/{id}/{action}", id = "{id}"),
            &["202", "401", "404", "409"],
        );
    }
    has("get", "/readyz", &["200", "503"]);
    has("get", "/v1/opt-outs", &["200", "400", "401"]);
    has("post", "/v1/opt-outs", &["200", "400", "401", "413"]);
    has("get", "/v1/opt-outs/{phone}", &["200", "401", "404"]);
    has("delete", "/v1/opt-outs/{phone}", &["204", "401", "404"]);

    let schemas = &doc["components"]["schemas"];
    let states: Vec<&str> = schemas["BatchState"]["enum"]
        .as_array()
        .expect("BatchState lists the states")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        states,
        [
            "initial",
            "scheduled",
            "preparing",
            "delivering",
            "paused",
            "completed",
            "failed",
            "cancelled"
        ]
    );
    let error = &schemas["ErrorBody"];
    assert_eq!(error["required"], json!(["error"]), "{error:#}");
    let detail = schemas["ErrorDetail"]["required"]
        .as_array()
        .expect("ErrorDetail");
    assert!(detail.contains(&json!("code")) && detail.contains(&json!("message")));
    for field in [
        "id",
        "name",
        "state",
        "current_step",
        "steps",
        "results",
        "partitions",
        "conditions",
    ] {
        assert!(
            schemas["Batch"]["properties"][field].is_object(),
            "the batch schema has {field}"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

/// A broker that refuses the login: the service keeps serving, `/readyz` (open to anyone) says
/// why without the password, and the logs carry the URL redacted.
#[test]
fn a_refused_broker_login_does_not_log_its_password() {
    let db = TestDb::new(Backend::Sqlite);
    let password = format!("pw-{}", uuid::Uuid::now_v7().simple());
    let queue = format!("smsbatch.test.{}", uuid::Uuid::now_v7().simple());
    let mut server = Logged::start(&[
        ("SMSBATCH__DATABASE__URL", db.url()),
        ("SMSBATCH__TRANSPORT__KIND", "rabbitmq"),
        (
            "SMSBATCH__TRANSPORT__AMQP_URL",
            &format!("amqp://guest:{password}@127.0.0.1:5672/%2f"),
        ),
        ("SMSBATCH__TRANSPORT__QUEUE", &queue),
        ("SMSBATCH__LOG__LEVEL", "trace"),
    ]);
    let base = server.base().to_owned();
    let checks = crate::common::eventually("the queue check failing", DEADLINE, || {
        match call(&base, "GET", "/readyz", None, None) {
            (503, _, body) if body["checks"]["queue"] != "ok" => Ok(body),
            (status, _, body) => Err(format!("{status}: {body}")),
        }
    });
    assert_absent(&checks.to_string(), &password, "/readyz");
    // `/readyz` can report the queue down while the first connection attempt is still under
    // way: wait for the refusal to be logged before stopping the server.
    crate::common::eventually("the refused login logged", DEADLINE, || {
        let output = server.output();
        if output.contains("amqp://guest:***@") {
            Ok(())
        } else {
            Err(format!("the broker URL is logged redacted:\n{output}"))
        }
    });
    let output = server.stop();
    assert_absent(&output, &password, "the broker password");
}

/// One request with any headers, redirects not followed; returns the status, the headers
/// (lower-case names) and the body as text.
fn send(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body<'_>,
) -> (u16, Vec<(String, String)>, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let url = format!("{base}{path}");
    let result = match method {
        "GET" | "DELETE" => {
            let mut req = if method == "GET" {
                agent.get(&url)
            } else {
                agent.delete(&url)
            };
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            req.call()
        }
        "POST" => {
            let mut req = agent.post(&url);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            match body {
                Some((content_type, body)) => req.content_type(content_type).send(body),
                None => req.send_empty(),
            }
        }
        other => panic!("no method {other} here"),
    };
    let mut response = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (status, headers, text)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The dashboard's session: `/ui/login` trades the token for a signed `HttpOnly`,
/// `SameSite=Strict` cookie, which opens `/ui/` and every `/v1/` route; a state-changing
/// request that relies on it must come from the server's own origin (403 otherwise, and
/// nothing is done); a forged or foreign cookie opens nothing; the bearer token works as before.
#[test]
fn the_session_cookie_opens_v1_from_the_same_origin_only() {
    let db = TestDb::new(Backend::Sqlite);
    let token = format!("tok-{}", uuid::Uuid::now_v7().simple());
    let server = TestServer::start(&db, &[("SMSBATCH__ADMIN__TOKEN", &token)]);
    let base = server.base_url();
    let bearer = format!("Bearer {token}");
    let login_form = format!("token={token}&next=%2Fui%2Fopt-outs");
    let form = Some(("application/x-www-form-urlencoded", login_form.as_str()));

    // The pages need a session; the login form and the assets do not.
    let (status, headers, _) = send(base, "GET", "/ui/batches/new", &[], None);
    assert_eq!(status, 303);
    assert_eq!(
        header(&headers, "location"),
        Some("/ui/login?next=%2Fui%2Fbatches%2Fnew")
    );
    let (status, _, _) = send(
        base,
        "GET",
        "/ui/batches/rows",
        &[("X-Fragment", "1")],
        None,
    );
    assert_eq!(status, 401, "a fragment is told, not redirected");
    for open in ["/ui/login", "/ui/assets/app.css", "/ui/assets/app.js"] {
        let (status, _, _) = send(base, "GET", open, &[], None);
        assert_eq!(status, 200, "GET {open}");
    }
    // Not with the bearer token either: the pages are the session's.
    let (status, _, _) = send(base, "GET", "/ui/", &[("Authorization", &bearer)], None);
    assert_eq!(status, 303);

    // A login posted from another origin, or without one, or with the wrong token: no cookie.
    for (origin, form, expected) in [
        (Some("http://evil.example"), form, 403),
        (None, form, 403),
        (
            Some(base),
            Some(("application/x-www-form-urlencoded", "token=wrong")),
            401,
        ),
    ] {
        let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
        let (status, reply, _) = send(base, "POST", "/ui/login", &headers, form);
        assert_eq!(status, expected, "login from {origin:?}");
        assert_eq!(header(&reply, "set-cookie"), None);
    }
    let (status, reply, _) = send(base, "POST", "/ui/login", &[("Origin", base)], form);
    assert_eq!(status, 303);
    assert_eq!(header(&reply, "location"), Some("/ui/opt-outs"));
    let set_cookie = header(&reply, "set-cookie")
        .expect("a session cookie")
        .to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(
            set_cookie.contains(attribute),
            "{attribute} in {set_cookie}"
        );
    }
    assert!(
        !set_cookie.contains(&token),
        "the token is not in the cookie"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    assert!(cookie.starts_with("smsbatch_session="), "{cookie}");

    // A batch and an opt-out to aim at, made with the bearer token.
    let create = json!({"name": "cookie", "content": "Hi {{name}}",
                        "recipients": [{"phone": "+8613800001234", "vars": {"name": "Ann"}}]})
    .to_string();
    let (status, _, batch) = call(
        base,
        "POST",
        "/v1/batches",
        Some(&bearer),
        Some(("application/json", &create)),
    );
    assert_eq!(status, 201);
    let id = batch["id"].as_str().unwrap().to_owned();
    let phones = r#"{"phones": ["+8613800001236"]}"#;
    let (status, _, _) = call(
        base,
        "POST",
        "/v1/opt-outs",
        Some(&bearer),
        Some(("application/json", phones)),
    );
    assert_eq!(status, 200);

    // Reading needs only the cookie.
    let with_cookie = [("Cookie", cookie.as_str())];
    for path in [
        "/v1/batches".to_owned(),
        format!("/v1/batches/{id}"),
        format!("/v1/batches/{id}/messages"),
        "/v1/opt-outs".to_owned(),
        "/v1/opt-outs/%2B8613800001236".to_owned(),
        "/ui/".to_owned(),
        format!("/ui/batches/{id}"),
        "/ui/opt-outs".to_owned(),
    ] {
        let (status, _, body) = send(base, "GET", &path, &with_cookie, None);
        assert_eq!(status, 200, "GET {path} with the cookie: {body}");
    }
    let (status, _, _) = send(base, "GET", "/v1/secrets", &with_cookie, None);
    assert_eq!(status, 404, "an unknown route is still unknown");

    // Every state-changing route refuses the cookie from elsewhere, and does nothing.
    let csv = "phone\n+8613800001235\n";
    let changes: Vec<(&str, String, Body<'_>)> = vec![
        (
            "POST",
            "/v1/batches".into(),
            Some(("application/json", create.as_str())),
        ),
        (
            "POST",
            format!("/v1/batches/{id}/recipients"),
            Some(("text/csv", csv)),
        ),
        ("POST", format!("/v1/batches/{id}/start"), None),
        ("POST", format!("/v1/batches/{id}/pause"), None),
        ("POST", format!("/v1/batches/{id}/resume"), None),
        ("POST", format!("/v1/batches/{id}/cancel"), None),
        ("POST", format!("/v1/batches/{id}/retry"), None),
        (
            "POST",
            format!("/v1/batches/{id}/resend"),
            Some(("application/json", r#"{"statuses": ["failed"]}"#)),
        ),
        (
            "POST",
            "/v1/opt-outs".into(),
            Some(("application/json", r#"{"phones": ["+8613800001237"]}"#)),
        ),
        ("POST", "/v1/opt-outs".into(), Some(("text/csv", csv))),
        ("DELETE", "/v1/opt-outs/%2B8613800001236".into(), None),
        ("POST", "/ui/logout".into(), None),
        (
            "POST",
            "/ui/preview".into(),
            Some(("application/x-www-form-urlencoded", "content=Hi")),
        ),
    ];
    let elsewhere: [&[(&str, &str)]; 5] = [
        &[("Origin", "http://evil.example")],
        &[("Origin", "null")],
        &[("Sec-Fetch-Site", "cross-site")],
        &[("Sec-Fetch-Site", "same-site"), ("Origin", base)],
        &[],
    ];
    for (method, path, body) in &changes {
        for extra in elsewhere {
            let mut headers = with_cookie.to_vec();
            headers.extend_from_slice(extra);
            let (status, _, reply) = send(base, method, path, &headers, *body);
            let context = format!("{method} {path} with the cookie and {extra:?}");
            let reply: Value = serde_json::from_str(&reply).unwrap_or(Value::Null);
            assert_error(&(status, reply), 403, "forbidden", &context);
        }
    }
    let (_, _, after) = call(
        base,
        "GET",
        &format!("/v1/batches/{id}"),
        Some(&bearer),
        None,
    );
    assert_eq!(after["state"], "initial", "{after:#}");
    assert_eq!(num(&after, "/results/recipients"), 1);
    let (_, _, page) = call(base, "GET", "/v1/batches", Some(&bearer), None);
    assert_eq!(
        page["items"].as_array().unwrap().len(),
        1,
        "no batch was created"
    );
    let (_, _, list) = call(base, "GET", "/v1/opt-outs", Some(&bearer), None);
    let listed: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["phone"].as_str())
        .collect();
    assert_eq!(listed, ["+8613800001236"]);

    // From the same origin, the cookie does what the token does.
    for same in [
        &[("Origin", base)][..],
        &[("Sec-Fetch-Site", "same-origin")][..],
    ] {
        let mut headers = with_cookie.to_vec();
        headers.extend_from_slice(same);
        let (status, _, body) = send(
            base,
            "POST",
            "/v1/opt-outs",
            &headers,
            Some(("application/json", phones)),
        );
        assert_eq!(status, 200, "{same:?}: {body}");
    }
    let mut headers = with_cookie.to_vec();
    headers.push(("Origin", base));
    let (status, _, body) = send(
        base,
        "POST",
        &format!("/v1/batches/{id}/start"),
        &headers,
        None,
    );
    assert_eq!(status, 202, "{body}");

    // A cookie that this token did not sign opens nothing; a wrong bearer token is not saved by
    // a good cookie.
    let (_, value) = cookie.split_once('=').unwrap();
    // The last hex digit changed to another one (never to itself: that was a flake).
    let last = if value.ends_with('0') { '1' } else { '0' };
    let tampered = format!("smsbatch_session={}{last}", &value[..value.len() - 1]);
    for forged in [
        format!("smsbatch_session={token}"),
        tampered,
        "smsbatch_session=".to_owned(),
        format!("other={value}"),
    ] {
        let (status, _, _) = send(base, "GET", "/v1/batches", &[("Cookie", &forged)], None);
        assert_eq!(status, 401, "{forged}");
        let (status, _, _) = send(base, "GET", "/ui/", &[("Cookie", &forged)], None);
        assert_eq!(status, 303, "{forged}");
    }
    let (status, _, _) = send(
        base,
        "GET",
        "/v1/batches",
        &[("Cookie", &cookie), ("Authorization", "Bearer wrong")],
        None,
    );
    assert_eq!(status, 401);

    // Logging out tells the browser to forget the cookie.
    let (status, reply, _) = send(base, "POST", "/ui/logout", &headers, None);
    assert_eq!(status, 303);
    assert!(header(&reply, "set-cookie").is_some_and(|c| c.contains("Max-Age=0")));
}
