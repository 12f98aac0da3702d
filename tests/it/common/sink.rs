//! An SMS gateway stand-in for tests: an HTTP/1.1 server on `127.0.0.1:0`, on plain threads
//! inside the test process, that records every message the `http` provider POSTs to it and
//! answers as the test tells it at run time. Counting what it received, outside the service, is
//! how a test proves that nothing was lost and nothing sent twice.
//!
//! Rules are looked at in this order for each request: a hang (the request is held, then the
//! connection closed without an answer), an outage (a 5xx, or any status, to every number), a
//! refusal by number (a 4xx to numbers matching a predicate), else 2xx with a gateway id. A
//! latency rule (`slow_for`, `slow_next`) delays the answer of a request that is not hung,
//! whatever the answer; the request is recorded when it arrives, its answer decided then.
//!
//! It needs only `std` and `serde_json`, so the library's own unit tests include it too
//! (`src/provider/http.rs`). Plain threads, one per connection, keep it independent of whatever
//! runtime the test uses; the provider keeps a few dozen connections at most.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Largest request head (request line and headers) the sink reads.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body the sink reads.
const MAX_BODY: usize = 1024 * 1024;

/// How the sink answered one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A 2xx with a gateway id: the SMS went out.
    Accepted(u16),
    /// A non-2xx status (an outage's 5xx, a refusal's 4xx, or whatever a rule said).
    Refused(u16),
    /// No answer: the connection was held, then closed.
    Hung,
    /// The request was not the provider's JSON (400).
    Malformed,
}

impl Answer {
    /// True for a 2xx.
    pub fn is_accepted(self) -> bool {
        matches!(self, Answer::Accepted(_))
    }
}

/// One request the sink received, in arrival order.
#[derive(Debug, Clone)]
pub struct Received {
    /// Arrival order, from 0.
    pub seq: u64,
    /// The message id (`id` of the body).
    pub id: i64,
    /// The destination (`to`).
    pub to: String,
    /// The text (`body`).
    pub body: String,
    /// The attempt number (`attempt`).
    pub attempt: i64,
    /// The `Idempotency-Key` header, if sent.
    pub idempotency_key: Option<String>,
    /// The `Authorization` header, if sent.
    pub authorization: Option<String>,
    /// What the sink answered.
    pub answer: Answer,
}

impl Received {
    /// True when the idempotency key is the message id, as the provider must send it.
    pub fn key_matches(&self) -> bool {
        self.idempotency_key.as_deref() == Some(self.id.to_string().as_str())
    }
}

/// A message id received more than once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    /// The message id.
    pub id: i64,
    /// Requests that carried it.
    pub times: usize,
    /// How many of them were answered 2xx (more than one: the SMS went out twice).
    pub accepted: usize,
    /// True when every one carried the message id as its idempotency key.
    pub keys_match: bool,
    /// Their attempt numbers, in arrival order.
    pub attempts: Vec<i64>,
}

/// Requests and 2xx answers for one phone number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PhoneCount {
    /// Requests for the number.
    pub received: usize,
    /// Of those, answered 2xx.
    pub accepted: usize,
}

/// What the sink saw, counted.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every request, malformed ones included.
    pub total: usize,
    /// Requests that were not the provider's JSON.
    pub malformed: usize,
    /// Distinct message ids.
    pub distinct_ids: usize,
    /// Requests answered 2xx.
    pub accepted: usize,
    /// Distinct message ids answered 2xx at least once.
    pub accepted_ids: usize,
    /// Ids received more than once, by id.
    pub duplicates: Vec<Duplicate>,
    /// Ids answered 2xx more than once: SMS sent twice.
    pub accepted_twice: Vec<i64>,
    /// Requests whose `Idempotency-Key` is missing or not their message id.
    pub key_mismatches: usize,
    /// Requests and acceptances by phone number.
    pub per_phone: BTreeMap<String, PhoneCount>,
}

type NumberPredicate = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The rules the test set, and what was received.
#[derive(Default)]
struct State {
    received: Vec<Received>,
    /// Hold requests: the next `count` of them, or all until `until`; each for `hold`.
    hang: Option<Rule>,
    hang_hold: Duration,
    /// Delay the answers: of the next `count` requests, or of all until `until`; by `slow_delay`.
    slow: Option<Rule>,
    slow_delay: Duration,
    /// Answer every request with a status: the next `count`, or all until `until`.
    outage: Option<Rule>,
    outage_status: u16,
    /// Answer numbers matching the predicate with a status.
    refuse: Option<(NumberPredicate, u16)>,
    /// The status and body of an acceptance; `None` body: `{"id": "sink-<seq>"}`.
    accept_status: u16,
    accept_body: Option<String>,
    /// Open connections, to close when the sink stops.
    conns: HashMap<u64, TcpStream>,
    next_conn: u64,
}

/// How long a hang or outage rule lasts.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// For the next this many requests.
    Count(u64),
    /// For requests arriving before then.
    Until(Instant),
}

impl Rule {
    /// True when the rule applies to a request arriving now; uses one of its count.
    fn take(rule: &mut Option<Rule>) -> bool {
        match rule {
            Some(Rule::Count(n)) if *n > 0 => {
                *n -= 1;
                true
            }
            Some(Rule::Until(until)) if Instant::now() < *until => true,
            _ => {
                *rule = None;
                false
            }
        }
    }
}

struct Shared {
    state: Mutex<State>,
    stopped: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The gateway stand-in; stops (closing every connection) when dropped.
pub struct Sink {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Sink {
    /// Starts a sink that accepts everything with 200 until told otherwise.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the sink");
        let addr = listener.local_addr().expect("the sink's address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                accept_status: 200,
                ..State::default()
            }),
            stopped: AtomicBool::new(false),
        });
        let accepting = Arc::clone(&shared);
        thread::spawn(move || {
            for stream in listener.incoming() {
                if accepting.stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let conn = {
                    let mut state = accepting.lock();
                    let conn = state.next_conn;
                    state.next_conn += 1;
                    if let Ok(clone) = stream.try_clone() {
                        state.conns.insert(conn, clone);
                    }
                    conn
                };
                let serving = Arc::clone(&accepting);
                thread::spawn(move || {
                    serve(&serving, stream);
                    serving.lock().conns.remove(&conn);
                });
            }
        });
        Self { addr, shared }
    }

    /// The URL to configure the provider with.
    pub fn url(&self) -> String {
        format!("http://{}/sms", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers the next `n` requests with `status` (a 5xx, usually), whatever their number.
    pub fn fail_next(&self, n: u64, status: u16) {
        let mut state = self.shared.lock();
        state.outage = Some(Rule::Count(n));
        state.outage_status = status;
    }

    /// Answers every request arriving in the next `window` with `status` (a 5xx, usually).
    pub fn fail_for(&self, window: Duration, status: u16) {
        let mut state = self.shared.lock();
        state.outage = Some(Rule::Until(Instant::now() + window));
        state.outage_status = status;
    }

    /// Answers every request for a number matching `refuse` with `status` (a 4xx, usually).
    pub fn refuse_when(&self, status: u16, refuse: impl Fn(&str) -> bool + Send + Sync + 'static) {
        self.shared.lock().refuse = Some((Arc::new(refuse), status));
    }

    /// Answers every request for a number ending with one of `suffixes` with `status`.
    pub fn refuse_ending(&self, suffixes: &[&str], status: u16) {
        let suffixes: Vec<String> = suffixes.iter().map(|s| (*s).to_owned()).collect();
        self.refuse_when(status, move |to| suffixes.iter().any(|s| to.ends_with(s)));
    }

    /// Holds the next `n` requests for `hold` each, then closes their connections unanswered.
    pub fn hang_next(&self, n: u64, hold: Duration) {
        let mut state = self.shared.lock();
        state.hang = Some(Rule::Count(n));
        state.hang_hold = hold;
    }

    /// Holds every request arriving in the next `window` for `hold`, then closes its connection
    /// unanswered.
    pub fn hang_for(&self, window: Duration, hold: Duration) {
        let mut state = self.shared.lock();
        state.hang = Some(Rule::Until(Instant::now() + window));
        state.hang_hold = hold;
    }

    /// Answers every request arriving in the next `window` only after `delay` (a slow gateway:
    /// calls stay in flight that long). A hang rule still wins over it.
    pub fn slow_for(&self, window: Duration, delay: Duration) {
        let mut state = self.shared.lock();
        state.slow = Some(Rule::Until(Instant::now() + window));
        state.slow_delay = delay;
    }

    /// Answers the next `n` requests only after `delay`. A hang rule still wins over it.
    pub fn slow_next(&self, n: u64, delay: Duration) {
        let mut state = self.shared.lock();
        state.slow = Some(Rule::Count(n));
        state.slow_delay = delay;
    }

    /// Accepts with `status` (a 2xx) and `body` instead of 200 and `{"id": "sink-<seq>"}`.
    pub fn accept_with(&self, status: u16, body: Option<&str>) {
        let mut state = self.shared.lock();
        state.accept_status = status;
        state.accept_body = body.map(str::to_owned);
    }

    /// Drops every rule: 200 with an id to everything from now on. What was received stays.
    pub fn reset_rules(&self) {
        let mut state = self.shared.lock();
        state.hang = None;
        state.slow = None;
        state.outage = None;
        state.refuse = None;
        state.accept_status = 200;
        state.accept_body = None;
    }

    /// Requests received so far.
    pub fn total(&self) -> usize {
        self.shared.lock().received.len()
    }

    /// Every request received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.lock().received.clone()
    }

    /// The requests that carried message `id`, in arrival order.
    pub fn requests_for(&self, id: i64) -> Vec<Received> {
        let state = self.shared.lock();
        state
            .received
            .iter()
            .filter(|r| r.id == id)
            .cloned()
            .collect()
    }

    /// Counts what was received so far.
    pub fn report(&self) -> Report {
        let state = self.shared.lock();
        let mut report = Report {
            total: state.received.len(),
            ..Report::default()
        };
        let mut by_id: BTreeMap<i64, Vec<&Received>> = BTreeMap::new();
        for r in &state.received {
            if r.answer == Answer::Malformed {
                report.malformed += 1;
                continue;
            }
            by_id.entry(r.id).or_default().push(r);
            if r.answer.is_accepted() {
                report.accepted += 1;
            }
            if !r.key_matches() {
                report.key_mismatches += 1;
            }
            let phone = report.per_phone.entry(r.to.clone()).or_default();
            phone.received += 1;
            phone.accepted += usize::from(r.answer.is_accepted());
        }
        report.distinct_ids = by_id.len();
        for (id, requests) in by_id {
            let accepted = requests.iter().filter(|r| r.answer.is_accepted()).count();
            if accepted > 0 {
                report.accepted_ids += 1;
            }
            if accepted > 1 {
                report.accepted_twice.push(id);
            }
            if requests.len() > 1 {
                report.duplicates.push(Duplicate {
                    id,
                    times: requests.len(),
                    accepted,
                    keys_match: requests.iter().all(|r| r.key_matches()),
                    attempts: requests.iter().map(|r| r.attempt).collect(),
                });
            }
        }
        report
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
        for (_, conn) in self.shared.lock().conns.drain() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

/// One parsed request.
struct Request {
    close: bool,
    idempotency_key: Option<String>,
    authorization: Option<String>,
    body: Vec<u8>,
}

/// Serves one connection's requests until it closes (HTTP/1.1 keep-alive).
fn serve(shared: &Shared, stream: TcpStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    while !shared.stopped.load(Ordering::SeqCst) {
        let request = match read_request(&mut reader) {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(reason) => {
                let _ = respond(&mut writer, 400, reason.as_bytes(), true);
                return;
            }
        };
        let (status, body, hold, delay) = decide(shared, &request);
        if let Some(hold) = hold {
            thread::sleep(hold);
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
        if let Some(delay) = delay {
            thread::sleep(delay);
        }
        if respond(&mut writer, status, body.as_bytes(), request.close).is_err() || request.close {
            return;
        }
    }
}

/// Records the request and picks its answer: (status, body, hold instead of answering, delay
/// before answering).
fn decide(shared: &Shared, request: &Request) -> (u16, String, Option<Duration>, Option<Duration>) {
    let parsed = serde_json::from_slice::<serde_json::Value>(&request.body)
        .ok()
        .and_then(|v| {
            Some((
                v.get("id")?.as_i64()?,
                v.get("to")?.as_str()?.to_owned(),
                v.get("body")?.as_str()?.to_owned(),
                v.get("attempt")?.as_i64()?,
            ))
        });
    let mut state = shared.lock();
    let seq = state.received.len() as u64;
    let Some((id, to, body, attempt)) = parsed else {
        state.received.push(Received {
            seq,
            id: 0,
            to: String::new(),
            body: String::from_utf8_lossy(&request.body).into_owned(),
            attempt: 0,
            idempotency_key: request.idempotency_key.clone(),
            authorization: request.authorization.clone(),
            answer: Answer::Malformed,
        });
        return (
            400,
            r#"{"error":"not the provider's JSON"}"#.into(),
            None,
            None,
        );
    };
    let (answer, status, reply, hold) = if Rule::take(&mut state.hang) {
        (Answer::Hung, 0, String::new(), Some(state.hang_hold))
    } else if Rule::take(&mut state.outage) {
        let status = state.outage_status;
        (
            Answer::Refused(status),
            status,
            r#"{"error":"gateway outage"}"#.into(),
            None,
        )
    } else if let Some((_, status)) = state.refuse.as_ref().filter(|(refuse, _)| refuse(&to)) {
        let status = *status;
        (
            Answer::Refused(status),
            status,
            r#"{"error":"invalid destination"}"#.into(),
            None,
        )
    } else {
        let status = state.accept_status;
        let reply = state
            .accept_body
            .clone()
            .unwrap_or_else(|| format!(r#"{{"id":"sink-{seq}"}}"#));
        (Answer::Accepted(status), status, reply, None)
    };
    let delay = (hold.is_none() && Rule::take(&mut state.slow)).then_some(state.slow_delay);
    state.received.push(Received {
        seq,
        id,
        to,
        body,
        attempt,
        idempotency_key: request.idempotency_key.clone(),
        authorization: request.authorization.clone(),
        answer,
    });
    (status, reply, hold, delay)
}

/// Reads one request; `Ok(None)` when the client closed the connection between requests.
fn read_request(reader: &mut BufReader<TcpStream>) -> Result<Option<Request>, String> {
    let mut head = 0usize;
    let mut line = String::new();
    let read_line = |reader: &mut BufReader<TcpStream>, line: &mut String, head: &mut usize| {
        line.clear();
        let n = reader
            .by_ref()
            .take((MAX_HEAD - *head) as u64 + 1)
            .read_line(line)
            .map_err(|e| e.to_string())?;
        *head += n;
        if *head > MAX_HEAD {
            return Err("request head too large".to_owned());
        }
        Ok(n)
    };
    if read_line(reader, &mut line, &mut head)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(_target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("bad request line {:?}", line.trim_end()));
    };
    let method = method.to_owned();
    let mut close = version.eq_ignore_ascii_case("HTTP/1.0");
    let mut length = 0usize;
    let mut idempotency_key = None;
    let mut authorization = None;
    loop {
        if read_line(reader, &mut line, &mut head)? == 0 {
            return Err("connection closed in the request head".into());
        }
        let header = line.trim_end_matches(['\r', '\n']);
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(format!("bad header line {header:?}"));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                length = value
                    .parse()
                    .map_err(|_| format!("bad content-length {value:?}"))?;
            }
            "transfer-encoding" => return Err("chunked bodies are not supported".into()),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            "idempotency-key" => idempotency_key = Some(value.to_owned()),
            "authorization" => authorization = Some(value.to_owned()),
            _ => {}
        }
    }
    if method != "POST" {
        return Err(format!("method {method} is not POST"));
    }
    if length > MAX_BODY {
        return Err("body too large".into());
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(Some(Request {
        close,
        idempotency_key,
        authorization,
        body,
    }))
}

/// Writes one answer with a JSON body.
fn respond(writer: &mut TcpStream, status: u16, body: &[u8], close: bool) -> std::io::Result<()> {
    // A 204 has no body, whatever the rule said.
    let body = if status == 204 { &[][..] } else { body };
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n",
        reason(status),
        body.len(),
        if close { "connection: close\r\n" } else { "" },
    );
    // One write: a head and a body written apart meet Nagle's algorithm and the client's
    // delayed ACK, which holds every answer back about 40 ms.
    let mut answer = head.into_bytes();
    answer.extend_from_slice(body);
    writer.write_all(&answer)?;
    writer.flush()
}

/// The reason phrase of the statuses tests use.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        408 => "Request Timeout",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
