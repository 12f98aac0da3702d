//! The command-line client: the built `smsbatch` binary run as an operator or a script would,
//! against the real server. `send --follow` exits 0 when the batch completes and 1 when it is
//! cancelled; `messages ID --status failed` writes exactly the failed messages as CSV;
//! `opt-outs import` then `export` round-trips; `--output json` parses; errors exit non-zero
//! with the API's message, and the token comes from `SMSBATCH_TOKEN`.
#![allow(clippy::unwrap_used)]

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Backend, TestDb, TestServer, eventually, mobile, national, text};
use crate::export::{HEADER, parse_csv};

const DEADLINE: Duration = Duration::from_secs(180);

/// A file in the temporary folder, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(contents: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("smsbatch-cli-{}.csv", uuid::Uuid::now_v7()));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The client command for `server` with `token` (none: `SMSBATCH_TOKEN` unset), its output
/// piped: not a terminal, so progress comes as plain lines.
fn smsbatch(server: &TestServer, token: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_smsbatch"));
    cmd.args(args)
        .env("SMSBATCH_URL", server.base_url())
        .env_remove("SMSBATCH_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(token) = token {
        cmd.env("SMSBATCH_TOKEN", token);
    }
    cmd
}

/// Runs a client command to its end.
fn run(server: &TestServer, token: Option<&str>, args: &[&str]) -> Output {
    smsbatch(server, token, args).output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the exit status, showing both streams otherwise.
fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit status\nstdout:\n{}\nstderr:\n{}",
        stdout(out),
        stderr(out)
    );
}

fn server_with_token(env: &[(&str, &str)]) -> (TestDb, TestServer, String) {
    let db = TestDb::new(Backend::Sqlite);
    let token = format!("tok-{}", uuid::Uuid::now_v7().simple());
    let mut all = vec![("SMSBATCH__ADMIN__TOKEN", token.as_str())];
    all.extend_from_slice(env);
    let server = TestServer::start(&db, &all);
    (db, server, token)
}

#[test]
fn send_follow_exits_0_when_completed_and_messages_writes_the_failed() {
    let (_db, server, token) = server_with_token(&[]);
    let token = Some(token.as_str());
    // 40 recipients, 4 of whose numbers end 0001 and fail; names with commas and quotes.
    let mut csv = String::from("phone,name\n");
    let mut failing = Vec::new();
    for i in 0..40u64 {
        let last = if i % 10 == 3 { 1 } else { 5 };
        let phone = mobile(i * 10_000 + last);
        if last == 1 {
            failing.push(phone.clone());
        }
        let _ = writeln!(csv, "{phone},\"Ann \"\"{i}\"\", Jr\"");
    }
    let file = TempFile::new(&csv);

    // Without the token: refused, exit 3, saying why.
    let refused = run(
        &server,
        None,
        &["send", file.path(), "--content", "Hi {{name}}"],
    );
    assert_exit(&refused, 3, "send without the token");
    assert!(stderr(&refused).contains("401"), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("SMSBATCH_TOKEN"),
        "{}",
        stderr(&refused)
    );

    let out = run(
        &server,
        token,
        &[
            "send",
            file.path(),
            "--content",
            "Hi {{name}}",
            "--name",
            "cli",
            "--follow",
            "--output",
            "json",
        ],
    );
    assert_exit(&out, 0, "send --follow of a batch that completes");
    let batch: Value =
        serde_json::from_str(&stdout(&out)).expect("--output json is one JSON batch");
    assert_eq!(batch["state"], "completed", "{batch:#}");
    assert_eq!(batch["name"], "cli");
    assert_eq!(batch["results"]["recipients"], 40);
    assert_eq!(batch["results"]["failed"], 4);
    let id = text(&batch, "/id").to_owned();
    // Progress came as plain lines on stderr (not a terminal), the last one final.
    let progress = stderr(&out);
    assert!(
        progress
            .lines()
            .last()
            .is_some_and(|l| l.contains(&id) && l.contains("completed")),
        "{progress}"
    );

    // `messages --status failed`: the header and exactly the failed numbers.
    let out = run(&server, token, &["messages", &id, "--status", "failed"]);
    assert_exit(&out, 0, "messages --status failed");
    let mut rows = parse_csv(&stdout(&out));
    assert_eq!(rows.remove(0).join(","), HEADER);
    let mut phones: Vec<String> = rows.iter().map(|r| r[0].clone()).collect();
    phones.sort();
    assert_eq!(phones, failing);
    assert!(
        rows.iter()
            .all(|r| r[1] == "failed" && r[5] == "invalid destination")
    );
    let all = run(&server, token, &["messages", &id]);
    assert_exit(&all, 0, "messages");
    assert_eq!(
        parse_csv(&stdout(&all)).len(),
        41,
        "the header and every message"
    );

    // `watch` of a completed batch exits 0 at once; `batches show` and `list` read it back.
    assert_exit(
        &run(&server, token, &["watch", &id]),
        0,
        "watch of a completed batch",
    );
    let shown = run(
        &server,
        token,
        &["batches", "show", &id, "--output", "json"],
    );
    assert_exit(&shown, 0, "batches show");
    let shown: Value = serde_json::from_str(&stdout(&shown)).unwrap();
    assert_eq!(shown["id"], Value::String(id.clone()));
    let listed = run(&server, token, &["batches", "list", "--output", "json"]);
    let listed: Value = serde_json::from_str(&stdout(&listed)).unwrap();
    assert_eq!(listed["items"][0]["id"], Value::String(id.clone()));
    let table = run(&server, token, &["batches", "list"]);
    assert!(
        stdout(&table)
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with(&id)),
        "{}",
        stdout(&table)
    );

    // An action the batch's state refuses: exit 3 with the API's message.
    let out = run(&server, token, &["batches", "pause", &id]);
    assert_exit(&out, 3, "pause of a completed batch");
    assert!(
        stderr(&out).contains("409 invalid_transition"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("cannot pause"), "{}", stderr(&out));
    let out = run(
        &server,
        token,
        &["batches", "show", &uuid::Uuid::now_v7().to_string()],
    );
    assert_exit(&out, 3, "show of an unknown batch");
    assert!(stderr(&out).contains("404 not_found"), "{}", stderr(&out));
}

#[test]
fn send_follow_exits_1_when_the_batch_is_cancelled() {
    // A slow provider: 60 messages at 20 a second take three seconds, time to cancel.
    let (_db, server, token) =
        server_with_token(&[("SMSBATCH__PROVIDERS__SIMULATOR__RATE_LIMIT", "20")]);
    let mut csv = String::from("phone\n");
    for i in 0..60u64 {
        let _ = writeln!(csv, "{}", mobile(i * 10_000 + 5));
    }
    let file = TempFile::new(&csv);
    let child = smsbatch(
        &server,
        Some(&token),
        &["send", file.path(), "--content", "Hello", "--follow"],
    )
    .spawn()
    .unwrap();

    let auth = format!("Bearer {token}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let get = |path: &str| -> Value {
        agent
            .get(format!("{}{path}", server.base_url()))
            .header("Authorization", &auth)
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap()
    };
    let id = eventually("the batch delivering", DEADLINE, || {
        let page = get("/v1/batches?state=delivering");
        page["items"][0]["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| page.to_string())
    });
    let cancelled = agent
        .post(format!("{}/v1/batches/{id}/cancel", server.base_url()))
        .header("Authorization", &auth)
        .send_empty()
        .unwrap();
    assert_eq!(cancelled.status(), 202);

    let out = child.wait_with_output().unwrap();
    assert_exit(&out, 1, "send --follow of a batch that is cancelled");
    let summary = stdout(&out);
    assert!(
        summary.contains(&format!("batch {id} cancelled")),
        "{summary}"
    );
    assert_eq!(get(&format!("/v1/batches/{id}"))["state"], "cancelled");
    // `watch` says the same of the ended batch.
    assert_exit(
        &run(&server, Some(&token), &["watch", &id]),
        1,
        "watch of a cancelled batch",
    );
}

#[test]
fn opt_outs_import_then_export_round_trips() {
    let (_db, server, token) = server_with_token(&[]);
    let token = Some(token.as_str());
    let numbers: Vec<String> = (0..30u64).map(|i| mobile(20_000_000 + i)).collect();
    // National and E.164 forms, another column, a repeat and a row that is no number.
    let mut csv = String::from("name,phone\n");
    for (i, phone) in numbers.iter().enumerate() {
        let form = if i % 2 == 0 {
            national(phone)
        } else {
            phone.clone()
        };
        let _ = writeln!(csv, "N{i},{form}");
    }
    let _ = writeln!(csv, "again,{}\nnobody,12345", numbers[0]);
    let file = TempFile::new(&csv);

    let out = run(
        &server,
        token,
        &["opt-outs", "import", file.path(), "--output", "json"],
    );
    assert_exit(&out, 0, "opt-outs import");
    let added: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(added, json!({"added": 30, "already": 1, "invalid": 1}));
    let out = run(&server, token, &["opt-outs", "add", &mobile(20_000_100)]);
    assert_exit(&out, 0, "opt-outs add");
    assert!(stdout(&out).starts_with("1 added"), "{}", stdout(&out));
    assert_exit(
        &run(&server, token, &["opt-outs", "remove", &mobile(20_000_100)]),
        0,
        "remove",
    );

    let exported = run(&server, token, &["opt-outs", "export"]);
    assert_exit(&exported, 0, "opt-outs export");
    let first = stdout(&exported);
    let mut rows = parse_csv(&first);
    assert_eq!(rows.remove(0), ["phone", "source", "created_at"]);
    let phones: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(phones, numbers, "every number, in E.164 and in order");
    assert!(rows.iter().all(|r| r[1] == "csv" && !r[2].is_empty()));

    // Emptied, then the export imported again: the same list.
    let mut remove = vec!["opt-outs", "remove"];
    remove.extend(numbers.iter().map(String::as_str));
    assert_exit(&run(&server, token, &remove), 0, "remove all");
    let empty = run(&server, token, &["opt-outs", "export"]);
    assert_eq!(stdout(&empty), "phone,source,created_at\n");
    let again = TempFile::new(&first);
    assert_exit(
        &run(&server, token, &["opt-outs", "import", again.path()]),
        0,
        "re-import",
    );
    let second = run(&server, token, &["opt-outs", "export"]);
    let phones_of = |text: &str| -> Vec<(String, String)> {
        parse_csv(text)
            .into_iter()
            .map(|r| (r[0].clone(), r[1].clone()))
            .collect()
    };
    assert_eq!(phones_of(&stdout(&second)), phones_of(&first));

    // JSON lines for scripts; removing a number not listed is an error, after the others.
    let lines = run(&server, token, &["opt-outs", "export", "--output", "json"]);
    let items: Vec<Value> = stdout(&lines)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(items.len(), 30);
    let out = run(
        &server,
        token,
        &["opt-outs", "remove", &mobile(29_999_999), &numbers[1]],
    );
    assert_exit(&out, 3, "remove of a number not listed");
    assert!(stderr(&out).contains("404"), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("{}: removed", numbers[1])));
}

#[test]
fn watch_outlives_a_lost_connection() {
    // 60 messages at 20 a second: three seconds of delivery, watched through a proxy that
    // drops every connection for two of them.
    let (_db, server, token) =
        server_with_token(&[("SMSBATCH__PROVIDERS__SIMULATOR__RATE_LIMIT", "20")]);
    let mut csv = String::from("phone\n");
    for i in 0..60u64 {
        let _ = writeln!(csv, "{}", mobile(i * 10_000 + 5));
    }
    let file = TempFile::new(&csv);
    let out = run(
        &server,
        Some(&token),
        &["send", file.path(), "--content", "Hi", "--output", "json"],
    );
    assert_exit(&out, 0, "send");
    let id = text(
        &serde_json::from_str::<Value>(&stdout(&out)).unwrap(),
        "/id",
    )
    .to_owned();

    let upstream = server.base_url().trim_start_matches("http://").to_owned();
    let proxy = crate::common::TcpProxy::start(&upstream);
    let mut watch = smsbatch(&server, Some(&token), &["watch", &id]);
    watch.env("SMSBATCH_URL", format!("http://127.0.0.1:{}", proxy.port()));
    let child = watch.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    proxy.cut();
    std::thread::sleep(Duration::from_secs(2));
    proxy.restore();
    let out = child.wait_with_output().unwrap();
    assert_exit(&out, 0, "watch through a lost connection");
    assert!(
        stdout(&out).contains(&format!("batch {id} completed")),
        "{}",
        stdout(&out)
    );
}
