//! The integration-test harness: a fresh database per test (a SQLite file or a PostgreSQL
//! database, both named by a UUID), the real `smsbatch` binary started as a child process on
//! port 0, and small blocking HTTP helpers that return the status with the body, so tests can
//! assert error answers as well as successes.
//!
//! Every wait here has a deadline only so that a stuck test fails with a readable message (the
//! last batch body and the server's last output lines); no deadline is an assertion about speed.
#![allow(dead_code, clippy::unwrap_used)]

/// Runs one scenario as two tests, one per store (in-process transport), or as three with the
/// production stack (PostgreSQL and RabbitMQ) as well. Test files that use it declare
/// `#[macro_use] mod common;`.
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($scenario:ident => $sqlite:ident, $postgres:ident) => {
        #[test]
        fn $sqlite() {
            $scenario(crate::common::Backend::Sqlite);
        }

        #[test]
        fn $postgres() {
            $scenario(crate::common::Backend::Postgres);
        }
    };
    ($scenario:ident => $sqlite:ident, $postgres:ident, $rabbitmq:ident) => {
        on_both_backends!($scenario => $sqlite, $postgres);

        #[test]
        fn $rabbitmq() {
            $scenario(crate::common::Backend::PostgresRabbitmq);
        }
    };
}

/// A scenario on the embedded store (SQLite, one instance) and on the production stack
/// (PostgreSQL + RabbitMQ, where the scenario starts two instances): `$scenario(Backend)`.
macro_rules! alone_and_paired {
    ($scenario:ident => $sqlite:ident, $paired:ident) => {
        #[test]
        fn $sqlite() {
            $scenario(crate::common::Backend::Sqlite);
        }

        #[test]
        fn $paired() {
            $scenario(crate::common::Backend::PostgresRabbitmq);
        }
    };
}

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

mod db;
pub use db::{Backend, TestDb};
pub mod faults;
pub mod otlp;
pub mod sink;
pub mod smsc;
pub mod tools;

/// How long the server may take to print its listening line (migrations included).
const STARTUP_DEADLINE: Duration = Duration::from_secs(90);
/// How often `wait_*` polls the batch.
const POLL_EVERY: Duration = Duration::from_millis(150);
/// Lines of server output kept to print when a test fails.
const TAIL_LINES: usize = 400;
/// Page size used when listing every message of a batch.
pub const MESSAGE_PAGE: usize = 1000;

/// The batch states from which nothing moves any more.
pub const FINAL_STATES: &[&str] = &["completed", "failed", "cancelled"];
/// The five lifecycle actions.
pub const ACTIONS: &[&str] = &["start", "pause", "resume", "cancel", "retry"];

/// The last lines the server wrote (stderr, and stdout lines other than the listening line).
type Tail = Arc<Mutex<VecDeque<String>>>;

fn push_line(tail: &Tail, line: String) {
    let mut tail = tail.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if tail.len() == TAIL_LINES {
        tail.pop_front();
    }
    tail.push_back(line);
}

/// Calls `f` for every line of `reader`, tolerating invalid UTF-8, until EOF or an error.
fn for_each_line(reader: impl Read, mut f: impl FnMut(String)) {
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                f(line.trim_end_matches(['\n', '\r']).to_owned());
            }
        }
    }
}

/// Extracts `http://…` from the line `smsbatch listening on http://127.0.0.1:PORT`.
fn listening_url(line: &str) -> Option<String> {
    const MARK: &str = "smsbatch listening on ";
    let rest = &line[line.find(MARK)? + MARK.len()..];
    let url = rest.split_whitespace().next()?;
    url.starts_with("http://")
        .then(|| url.trim_end_matches('/').to_owned())
}

/// An HTTP answer: status, content type and body text.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The HTTP status code.
    pub status: u16,
    /// The `Content-Type` header, empty when absent.
    pub content_type: String,
    /// The body as text.
    pub body: String,
}

impl Reply {
    /// The body parsed as JSON; `Null` when empty, the raw text as a JSON string when not JSON.
    pub fn json(&self) -> Value {
        if self.body.trim().is_empty() {
            return Value::Null;
        }
        serde_json::from_str(&self.body).unwrap_or_else(|_| Value::String(self.body.clone()))
    }
}

/// The `smsbatch` binary running as a child process against one test database.
pub struct TestServer {
    child: Child,
    base_url: String,
    db_url: String,
    env: Vec<(String, String)>,
    tail: Tail,
    agent: ureq::Agent,
}

impl TestServer {
    /// Starts `smsbatch serve` on port 0 against `db`, with `extra_env` overriding the test
    /// defaults (quick retries, warn-level logs); returns once it prints its listening line.
    pub fn start(db: &TestDb, extra_env: &[(&str, &str)]) -> Self {
        let mut env: Vec<(String, String)> = vec![
            ("SMSBATCH__SMSBATCH__RETRY_BACKOFF_MS".into(), "50".into()),
            ("SMSBATCH__LOG__LEVEL".into(), "warn".into()),
            // A killed server's batches are taken over once its leases expire: keep that short.
            ("SMSBATCH__SMSBATCH__LEASE_MS".into(), "3000".into()),
        ];
        env.extend(db.server_env());
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let tail: Tail = Arc::new(Mutex::new(VecDeque::new()));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .into();
        let (child, base_url) = spawn_server(db.url(), &env, &tail);
        Self {
            child,
            base_url,
            db_url: db.url().to_owned(),
            env,
            tail,
            agent,
        }
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server with SIGKILL (no chance to checkpoint) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the server to stop with SIGTERM and waits for it to exit; returns the exit code and
    /// how long it took.
    pub fn terminate(&mut self) -> (Option<i32>, Duration) {
        let started = Instant::now();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(sent.success(), "kill -TERM {} failed", self.pid());
        let status = self.child.wait().expect("wait for the server to exit");
        (status.code(), started.elapsed())
    }

    /// Starts the server again on the same database with the same environment (a new port);
    /// kills the running one first if it is still alive.
    pub fn restart(&mut self) {
        self.kill();
        push_line(&self.tail, "---------- harness: restart ----------".into());
        let (child, base_url) = spawn_server(&self.db_url, &self.env, &self.tail);
        self.child = child;
        self.base_url = base_url;
    }

    /// Resident memory now, in kB (`VmRSS`).
    pub fn rss_kb(&self) -> u64 {
        self.proc_status_kb("VmRSS:")
    }

    /// Peak resident memory since start, in kB (`VmHWM`).
    pub fn peak_rss_kb(&self) -> u64 {
        self.proc_status_kb("VmHWM:")
    }

    fn proc_status_kb(&self, key: &str) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {path}:\n{status}"))
    }

    /// The server's last output lines, for failure messages.
    pub fn output_tail(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.iter().fold(String::new(), |mut out, line| {
            let _ = writeln!(out, "{line}");
            out
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    fn finish(
        &self,
        what: &str,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Reply {
        let mut response = result.unwrap_or_else(|e| {
            // The server's last output is printed by `Drop` while the panic unwinds.
            panic!("{what}: request failed: {e}")
        });
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = response
            .body_mut()
            .with_config()
            .limit(256 * 1024 * 1024)
            .lossy_utf8(true)
            .read_to_string()
            .unwrap_or_else(|e| panic!("{what}: reading the body failed: {e}"));
        Reply {
            status,
            content_type,
            body,
        }
    }

    /// `GET path` (path starts with `/`).
    pub fn get(&self, path: &str) -> Reply {
        let url = self.url(path);
        self.finish(&format!("GET {path}"), self.agent.get(&url).call())
    }

    /// `GET path`, body as JSON.
    pub fn get_json(&self, path: &str) -> (u16, Value) {
        let reply = self.get(path);
        (reply.status, reply.json())
    }

    /// `POST path` with a JSON body.
    pub fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let url = self.url(path);
        let reply = self.finish(
            &format!("POST {path}"),
            self.agent.post(&url).send_json(body),
        );
        (reply.status, reply.json())
    }

    /// `POST path` with any body and content type (for malformed input).
    pub fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl ureq::AsSendBody,
    ) -> (u16, Value) {
        let url = self.url(path);
        let reply = self.finish(
            &format!("POST {path}"),
            self.agent.post(&url).content_type(content_type).send(body),
        );
        (reply.status, reply.json())
    }

    /// `POST path` with a `text/csv` body.
    pub fn post_csv(&self, path: &str, body: impl ureq::AsSendBody) -> (u16, Value) {
        self.post_raw(path, "text/csv", body)
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> (u16, Value) {
        let url = self.url(path);
        let reply = self.finish(&format!("DELETE {path}"), self.agent.delete(&url).call());
        (reply.status, reply.json())
    }

    /// `POST path` with no body.
    pub fn post_empty(&self, path: &str) -> (u16, Value) {
        let url = self.url(path);
        let reply = self.finish(&format!("POST {path}"), self.agent.post(&url).send_empty());
        (reply.status, reply.json())
    }

    /// `POST /v1/batches`, asserting 201 and state `initial`; returns the new batch's id.
    pub fn create_batch(&self, body: &Value) -> String {
        let (status, batch) = self.post_json("/v1/batches", body);
        assert_eq!(status, 201, "POST /v1/batches answered {status}: {batch:#}");
        assert_eq!(
            batch["state"], "initial",
            "a new batch is initial: {batch:#}"
        );
        batch["id"]
            .as_str()
            .unwrap_or_else(|| panic!("the created batch has a string id: {batch:#}"))
            .to_owned()
    }

    /// `POST /v1/batches/{id}/recipients` with a CSV body.
    pub fn upload_csv(&self, id: &str, csv: impl ureq::AsSendBody) -> (u16, Value) {
        self.post_csv(&format!("/v1/batches/{id}/recipients"), csv)
    }

    /// `POST /v1/batches/{id}/{action}` (start, pause, resume, cancel, retry).
    pub fn action(&self, id: &str, action: &str) -> (u16, Value) {
        self.post_empty(&format!("/v1/batches/{id}/{action}"))
    }

    /// `POST /v1/batches/{id}/{action}`, asserting 202 and the state it answers.
    pub fn action_ok(&self, id: &str, action: &str, expected_state: &str) -> Value {
        let (status, batch) = self.action(id, action);
        assert_eq!(status, 202, "{action} of {id} answered {status}: {batch:#}");
        assert_eq!(
            batch["state"], expected_state,
            "{action} of {id} answers the batch in state {expected_state}: {batch:#}"
        );
        batch
    }

    /// `GET /v1/batches/{id}`, asserting 200.
    pub fn batch(&self, id: &str) -> Value {
        let (status, batch) = self.get_json(&format!("/v1/batches/{id}"));
        assert_eq!(
            status, 200,
            "GET /v1/batches/{id} answered {status}: {batch:#}"
        );
        batch
    }

    /// Polls the batch until its state is one of `states`; fails at once if it reaches another
    /// final state, and after `deadline` with the last body.
    pub fn wait_for_state(&self, id: &str, states: &[&str], deadline: Duration) -> Value {
        self.wait_until(id, &format!("state in {states:?}"), deadline, |batch| {
            batch["state"]
                .as_str()
                .is_some_and(|state| states.contains(&state))
        })
    }

    /// Polls the batch until `done(batch)`; fails at once if the batch reaches a final state
    /// without `done` holding, and after `deadline` with the last body.
    pub fn wait_until(
        &self,
        id: &str,
        what: &str,
        deadline: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let give_up = Instant::now() + deadline;
        loop {
            let batch = self.batch(id);
            if done(&batch) {
                return batch;
            }
            let state = batch["state"].as_str().unwrap_or("?");
            if FINAL_STATES.contains(&state) {
                panic!(
                    "batch {id} reached final state {state} while waiting for {what}: {batch:#}"
                );
            }
            if Instant::now() > give_up {
                panic!("batch {id}: still not {what} after {deadline:?}; last body: {batch:#}");
            }
            thread::sleep(POLL_EVERY);
        }
    }

    /// Every message of the batch (optionally only those with `status`), following `next`.
    pub fn all_messages(&self, id: &str, status: Option<&str>) -> Vec<Value> {
        let mut items = Vec::new();
        self.for_each_message(id, status, |message| items.push(message.clone()));
        items
    }

    /// Calls `f` for every message of the batch (optionally only those with `status`), page by
    /// page, so that a large batch is never held whole in the test either.
    pub fn for_each_message(&self, id: &str, status: Option<&str>, mut f: impl FnMut(&Value)) {
        let mut after: Option<String> = None;
        let mut seen_cursors = HashSet::new();
        loop {
            let mut path = format!("/v1/batches/{id}/messages?limit={MESSAGE_PAGE}");
            if let Some(status) = status {
                let _ = write!(path, "&status={}", encode(status));
            }
            if let Some(after) = &after {
                let _ = write!(path, "&after={}", encode(after));
            }
            let (code, page) = self.get_json(&path);
            assert_eq!(code, 200, "GET {path} answered {code}: {page:#}");
            let page_items = page["items"]
                .as_array()
                .unwrap_or_else(|| panic!("GET {path}: items is an array: {page:#}"));
            page_items.iter().for_each(&mut f);
            match page["next"].as_str() {
                Some(next) => {
                    assert!(
                        seen_cursors.insert(next.to_owned()),
                        "GET {path}: the cursor {next} came back twice"
                    );
                    assert!(
                        !page_items.is_empty(),
                        "GET {path}: an empty page still has next = {next}"
                    );
                    after = Some(next.to_owned());
                }
                None => return,
            }
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- smsbatch output (last {TAIL_LINES} lines) ---\n{}",
                self.output_tail()
            );
        }
        self.kill();
    }
}

/// Spawns the binary and waits for its listening line; panics with its output otherwise.
fn spawn_server(db_url: &str, env: &[(String, String)], tail: &Tail) -> (Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_smsbatch"));
    cmd.arg("serve")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("SMSBATCH__HTTP__BIND", "127.0.0.1:0")
        .env("SMSBATCH__DATABASE__URL", db_url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        cmd.env(key, value);
    }
    let mut child = cmd.spawn().expect("spawn the smsbatch binary");

    let stderr = child.stderr.take().expect("stderr is piped");
    let stderr_tail = Arc::clone(tail);
    thread::spawn(move || for_each_line(stderr, |line| push_line(&stderr_tail, line)));

    let stdout = child.stdout.take().expect("stdout is piped");
    let stdout_tail = Arc::clone(tail);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut announced = false;
        for_each_line(stdout, |line| {
            if !announced && let Some(url) = listening_url(&line) {
                announced = true;
                let _ = tx.send(url);
                return;
            }
            push_line(&stdout_tail, format!("[stdout] {line}"));
        });
    });

    let give_up = Instant::now() + STARTUP_DEADLINE;
    let output = |tail: &Tail| {
        let tail = tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(url) => return (child, url),
            Err(RecvTimeoutError::Timeout) => {
                if let Ok(Some(exit)) = child.try_wait() {
                    thread::sleep(Duration::from_millis(300)); // let the readers drain
                    panic!(
                        "smsbatch exited ({exit}) before printing its listening line; output:\n{}",
                        output(tail)
                    );
                }
                if Instant::now() > give_up {
                    let _ = child.kill();
                    let _ = child.wait();
                    thread::sleep(Duration::from_millis(300));
                    panic!(
                        "smsbatch did not print its listening line within {STARTUP_DEADLINE:?}; \
                         output:\n{}",
                        output(tail)
                    );
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                let exit = child.wait();
                thread::sleep(Duration::from_millis(300));
                panic!(
                    "smsbatch closed stdout without printing its listening line ({exit:?}); \
                     output:\n{}",
                    output(tail)
                );
            }
        }
    }
}

/// Installs the npm packages of `dir` (pinned by its `package-lock.json`) once per machine:
/// `npm ci` when `node_modules/<package>` is missing, under a lock, since tests run in parallel
/// processes.
pub fn npm_ci(dir: &std::path::Path, package: &str) {
    let marker = format!("node_modules/{package}/package.json");
    if dir.join(&marker).exists() {
        return;
    }
    let status = Command::new("flock")
        .arg(dir.join(".npm.lock"))
        .args([
            "sh",
            "-c",
            &format!("[ -f {marker} ] || npm ci --no-audit --no-fund --loglevel=error"),
        ])
        .current_dir(dir)
        .status()
        .expect("run flock and npm (Node.js and npm must be installed)");
    assert!(status.success(), "npm ci in {} failed", dir.display());
}

/// A valid CN mobile number: `+86138` and eight digits.
pub fn mobile(n: u64) -> String {
    assert!(n < 100_000_000, "eight digits");
    format!("+86138{n:08}")
}

/// `+8613812345678` written the way a person would type it at home: `138 1234 5678`.
pub fn national(e164: &str) -> String {
    let digits = &e164[3..];
    format!("{} {} {}", &digits[..3], &digits[3..7], &digits[7..])
}

/// The E.164 form of a number made by `mobile` or `national`, `None` for anything else.
pub fn canonical(phone: &str) -> Option<String> {
    let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
    if let Some(rest) = phone.strip_prefix("+86138") {
        (rest.len() == 8 && rest.chars().all(|c| c.is_ascii_digit())).then(|| phone.to_owned())
    } else if phone.starts_with("138")
        && digits.len() == 11
        && phone.chars().all(|c| c.is_ascii_digit() || c == ' ')
    {
        Some(format!("+86{digits}"))
    } else {
        None
    }
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Now plus `ahead`, as RFC 3339 UTC with whole seconds (`2025-01-31T12:00:05Z`).
pub fn rfc3339_in(ahead: Duration) -> String {
    let secs = (SystemTime::now() + ahead)
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The unsigned integer at JSON pointer `ptr`, or a panic naming it and showing the body.
pub fn num(value: &Value, ptr: &str) -> u64 {
    value
        .pointer(ptr)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{ptr} is an unsigned integer in {value:#}"))
}

/// The string at JSON pointer `ptr`, or a panic naming it and showing the body.
pub fn text<'a>(value: &'a Value, ptr: &str) -> &'a str {
    value
        .pointer(ptr)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{ptr} is a string in {value:#}"))
}

/// Asserts an error answer: `status` and `{"error": {"code": code, "message": non-empty}}`.
pub fn assert_error(reply: &(u16, Value), status: u16, code: &str, context: &str) {
    let (got, body) = reply;
    assert_eq!(*got, status, "{context}: status (body {body:#})");
    assert_eq!(
        body.pointer("/error/code").and_then(Value::as_str),
        Some(code),
        "{context}: error code in {body:#}"
    );
    assert_error_message(body, context);
}

/// Asserts that `body` has a non-empty `error.message` (and a string `error.code`).
pub fn assert_error_message(body: &Value, context: &str) {
    assert!(
        body.pointer("/error/code")
            .and_then(Value::as_str)
            .is_some(),
        "{context}: error.code is a string in {body:#}"
    );
    let message = body.pointer("/error/message").and_then(Value::as_str);
    assert!(
        message.is_some_and(|m| !m.trim().is_empty()),
        "{context}: error.message is a non-empty string in {body:#}"
    );
}

/// Counts messages by their `status`.
pub fn count_by_status(messages: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for message in messages {
        let status = message["status"].as_str().unwrap_or("<missing>").to_owned();
        *counts.entry(status).or_insert(0) += 1;
    }
    counts
}

/// Calls `probe` every poll interval until it returns `Ok`; panics with its last `Err` after
/// `deadline` (a guard against a stuck test, not a speed assertion).
pub fn eventually<T>(
    what: &str,
    deadline: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let give_up = Instant::now() + deadline;
    loop {
        match probe() {
            Ok(value) => return value,
            Err(last) if Instant::now() > give_up => {
                panic!("still not {what} after {deadline:?}: {last}")
            }
            Err(_) => thread::sleep(POLL_EVERY),
        }
    }
}

/// A TCP forwarder between the server and a real dependency (RabbitMQ), so that a test can cut
/// the connection and restore it without touching the shared broker other tests use.
pub struct TcpProxy {
    port: u16,
    state: Arc<Mutex<ProxyState>>,
}

struct ProxyState {
    open: bool,
    conns: Vec<std::net::TcpStream>,
}

impl TcpProxy {
    /// Starts forwarding a free local port to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let state = Arc::new(Mutex::new(ProxyState {
            open: true,
            conns: Vec::new(),
        }));
        let shared = Arc::clone(&state);
        let upstream = upstream.to_owned();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let mut state = shared.lock().unwrap_or_else(|p| p.into_inner());
                if !state.open {
                    continue; // dropped: the dependency looks down
                }
                let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                    continue;
                };
                for stream in [&client, &server] {
                    if let Ok(clone) = stream.try_clone() {
                        state.conns.push(clone);
                    }
                }
                for (from, to) in [(&client, &server), (&server, &client)] {
                    if let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) {
                        thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            }
        });
        Self { port, state }
    }

    /// The local port to connect to instead of the upstream one.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every forwarded connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.open = false;
        for conn in state.conns.drain(..) {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).open = true;
    }
}

/// The value of one series (name and labels, as exposed) in a Prometheus text exposition; 0
/// when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}
