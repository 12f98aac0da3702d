//! The dashboard: its pages over HTTP, and the whole of it in a real browser. The browser
//! test starts the real server (an admin token; the simulator held to 40 messages a second, so
//! that a batch's progress and a pause are seen as they happen) and runs
//! `tests/ui/dashboard.test.mjs` under `node --test`: Debian's `chromium` driven by
//! `playwright-core` (pinned in `tests/ui/package-lock.json`, installed with `npm ci` on first
//! use). It saves a screenshot of each page in a folder under the target directory, or in
//! `SMSBATCH_UI_SCREENSHOTS` when set (`docs/screenshots` to refresh the README's).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{Backend, TestDb, TestServer};

/// Where Debian's package puts the browser.
const CHROMIUM: &str = "/usr/bin/chromium";
/// A deadline that only stops a stuck run.
const DEADLINE: Duration = Duration::from_secs(600);

fn folder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui")
}

#[test]
fn the_dashboard_in_a_real_browser() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install Debian's chromium package (.ci/run does)"
    );
    crate::common::npm_ci(&folder(), "playwright-core");
    let db = TestDb::new(Backend::Sqlite);
    let token = format!("tok-{}", uuid::Uuid::now_v7().simple());
    let server = TestServer::start(
        &db,
        &[
            ("SMSBATCH__ADMIN__TOKEN", &token),
            ("SMSBATCH__PROVIDERS__SIMULATOR__RATE_LIMIT", "40"),
        ],
    );
    let shots = std::env::var_os("SMSBATCH_UI_SCREENSHOTS")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
            }
        })
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("smsbatch-ui-{}", uuid::Uuid::now_v7().simple()))
        });

    let started = Instant::now();
    let mut child = Command::new("node")
        .args(["--test", "--test-reporter=spec", "--test-concurrency=1"])
        .arg(folder().join("dashboard.test.mjs"))
        .env("SMSBATCH_URL", server.base_url())
        .env("SMSBATCH_TOKEN", &token)
        .env("SMSBATCH_SCREENSHOTS", &shots)
        .current_dir(folder())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node --test (the browser tests need Node.js 20 or later)");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let out = thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let err = thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the browser tests did not end within {DEADLINE:?}");
        }
        thread::sleep(Duration::from_millis(200));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    println!("{out}\n{err}");
    eprintln!("browser tests: {:.1} s", started.elapsed().as_secs_f64());
    assert!(
        status.success(),
        "node --test failed ({status}):\n{out}\n{err}\n--- server ---\n{}",
        server.output_tail()
    );
    for page in [
        "login",
        "new-batch",
        "batch",
        "batches",
        "batches-phone",
        "opt-outs",
    ] {
        let png = std::fs::read(shots.join(format!("{page}.png")))
            .unwrap_or_else(|e| panic!("the screenshot of {page}: {e}"));
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{page}.png is a picture"
        );
    }
    if std::env::var_os("SMSBATCH_UI_SCREENSHOTS").is_none() {
        let _ = std::fs::remove_dir_all(&shots);
    }
}

/// Without an admin token the dashboard is open, like the API: every page answers, and the
/// login form sends the person on.
#[test]
fn without_a_token_the_dashboard_is_open() {
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(&db, &[]);
    let id = server.create_batch(&json!({"name": "open", "content": "Hi {{name}}",
        "recipients": [{"phone": "+8613800001234", "vars": {"name": "Ann"}}]}));
    for path in [
        "/ui/".to_owned(),
        "/ui/batches/new".to_owned(),
        format!("/ui/batches/{id}"),
        format!("/ui/batches/{id}/live"),
        format!("/ui/batches/{id}/messages.csv?status=failed"),
        "/ui/batches/rows?state=initial".to_owned(),
        "/ui/opt-outs".to_owned(),
        "/ui/opt-outs.csv".to_owned(),
        "/ui/assets/app.js".to_owned(),
    ] {
        let reply = server.get(&path);
        assert_eq!(reply.status, 200, "GET {path}: {}", reply.body);
    }
    let list = server.get("/ui/");
    assert!(
        list.content_type.starts_with("text/html"),
        "{}",
        list.content_type
    );
    assert!(list.body.contains(&id), "the list shows the batch");
    assert!(!list.body.contains("Log out"), "nothing to log out of");
    let page = server.get(&format!("/ui/batches/{id}"));
    assert!(
        page.body.contains("data-action=\"start\""),
        "an initial batch offers start"
    );
    // Unknown pages and batches are HTML 404s; a bad filter is a 400.
    assert_eq!(server.get("/ui/nowhere").status, 404);
    let missing = server.get(&format!("/ui/batches/{}", uuid::Uuid::now_v7()));
    assert_eq!(missing.status, 404);
    assert!(missing.content_type.starts_with("text/html"));
    assert_eq!(server.get("/ui/?state=nonsense").status, 400);
}

/// The preview counts what creation counts (the static text, `{{url}}` as the link), and like
/// every state-changing request under `/ui/` it must come from the dashboard's own origin.
#[test]
fn the_preview_counts_like_creation() {
    let db = TestDb::new(Backend::Sqlite);
    let server = TestServer::start(&db, &[("SMSBATCH__HTTP__MAX_SEGMENTS", "2")]);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let preview = |content: &str, url: &str, origin: Option<&str>| {
        let body = format!(
            "content={}&url={}",
            crate::common::encode(content),
            crate::common::encode(url)
        );
        let mut req = agent
            .post(&format!("{}/ui/preview", server.base_url()))
            .content_type("application/x-www-form-urlencoded");
        if let Some(origin) = origin {
            req = req.header("Origin", origin);
        }
        let mut res = req.send(body.as_str()).unwrap();
        (
            res.status().as_u16(),
            res.body_mut().read_to_string().unwrap(),
        )
    };
    let base = server.base_url().to_owned();
    let ours = Some(base.as_str());

    let (status, _) = preview("Hi", "", None);
    assert_eq!(status, 403, "no origin");
    let (status, _) = preview("Hi", "", Some("http://evil.example"));
    assert_eq!(status, 403, "another origin");

    let (status, html) = preview("Hi {{name}}, 20% off", "", ours);
    assert_eq!(status, 200, "{html}");
    assert!(
        html.contains(r#"data-encoding="GSM-7" data-segments="1""#),
        "{html}"
    );
    let (_, html) = preview(&"好".repeat(71), "", ours);
    assert!(
        html.contains(r#"data-encoding="UCS-2" data-segments="2""#),
        "{html}"
    );

    // 300 characters and a 30-character link: 330 septets, three segments, over the two allowed.
    let long = format!("{}{{{{url}}}}", "x".repeat(300));
    let link = format!("https://shop.example/{}", "p".repeat(9));
    let (_, html) = preview(&long, &link, ours);
    assert!(html.contains(r#"data-segments="3""#), "{html}");
    assert!(html.contains("more than the 2 allowed"), "{html}");
    let (status, body) = server.post_json(
        "/v1/batches",
        &json!({"name": "long", "content": long, "url": link}),
    );
    assert_eq!(
        status, 422,
        "creation refuses what the preview flags: {body:#}"
    );
    let (_, html) = preview(&long, "", ours);
    assert!(
        html.contains(r#"data-segments="2""#),
        "without the link: {html}"
    );
    assert!(!html.contains("more than"), "{html}");

    // A form without its content is a 400, not a crash.
    let missing = agent
        .post(&format!("{}/ui/preview", server.base_url()))
        .header("Origin", server.base_url())
        .content_type("application/x-www-form-urlencoded")
        .send("url=x")
        .unwrap();
    assert_eq!(missing.status().as_u16(), 400);

    // A template that does not parse says why, as creation does.
    let (_, html) = preview("Hi {{name", "", ours);
    let (status, body) = server.post_json(
        "/v1/batches",
        &json!({"name": "bad", "content": "Hi {{name"}),
    );
    assert_eq!(status, 422, "{body:#}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        html.contains(message),
        "the preview says `{message}`: {html}"
    );
}

/// Two instances behind one address, as a load balancer would spread a browser's requests: a
/// session from one opens the other (it lives in no instance), and both show a batch with the
/// same numbers, read from the database.
#[test]
fn two_instances_share_sessions_and_show_the_same_numbers() {
    let db = TestDb::new(Backend::PostgresRabbitmq);
    let token = format!("tok-{}", uuid::Uuid::now_v7().simple());
    let env = [("SMSBATCH__ADMIN__TOKEN", token.as_str())];
    let a = TestServer::start(&db, &env);
    let b = TestServer::start(&db, &env);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let login = agent
        .post(&format!("{}/ui/login", a.base_url()))
        .header("Origin", a.base_url())
        .content_type("application/x-www-form-urlencoded")
        .send(format!("token={token}").as_str())
        .unwrap();
    assert_eq!(login.status().as_u16(), 303);
    let cookie = login
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("a session cookie")
        .to_owned();
    // Each call goes to one instance or the other, from that instance's own page.
    let call = |server: &TestServer, method: &str, path: &str, body: Option<serde_json::Value>| {
        let url = format!("{}{path}", server.base_url());
        let mut res = match (method, body) {
            ("GET", _) => agent.get(&url).header("Cookie", &cookie).call(),
            (_, Some(body)) => agent
                .post(&url)
                .header("Cookie", &cookie)
                .header("Origin", server.base_url())
                .send_json(body),
            (_, None) => agent
                .post(&url)
                .header("Cookie", &cookie)
                .header("Origin", server.base_url())
                .send_empty(),
        }
        .unwrap();
        let status = res.status().as_u16();
        (status, res.body_mut().read_to_string().unwrap())
    };
    let (status, _) = call(&b, "GET", "/ui/", None);
    assert_eq!(status, 200, "the session from instance a opens instance b");

    let recipients: Vec<_> = (0..50)
        .map(|i| json!({"phone": crate::common::mobile(1000 + i)}))
        .collect();
    let (status, created) = call(
        &b,
        "POST",
        "/v1/batches",
        Some(json!({"name": "two", "content": "Hi", "recipients": recipients})),
    );
    assert_eq!(status, 201, "{created}");
    let id = serde_json::from_str::<serde_json::Value>(&created).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = call(&a, "POST", &format!("/v1/batches/{id}/start"), None);
    assert_eq!(status, 202, "{body}");
    let done = crate::common::eventually("completed", std::time::Duration::from_secs(120), || {
        let (_, body) = call(&a, "GET", &format!("/v1/batches/{id}"), None);
        let batch: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        (batch["state"] == "completed").then_some(batch).ok_or(body)
    });
    let sent = done["results"]["sent"].as_u64().unwrap();
    assert_eq!(sent, 50);
    let (_, from_a) = call(&a, "GET", &format!("/ui/batches/{id}/live"), None);
    let (_, from_b) = call(&b, "GET", &format!("/ui/batches/{id}/live"), None);
    assert!(
        from_a.contains(&format!(r#"data-count="sent">{sent}<"#)),
        "{from_a}"
    );
    assert_eq!(from_a, from_b, "both instances render the same numbers");
}
