//! An OTLP/HTTP receiver for tests: an HTTP/1.1 server on `127.0.0.1:0`, on plain threads, that
//! takes `POST /v1/traces` in the JSON encoding (`OTEL_EXPORTER_OTLP_PROTOCOL=http/json`) and
//! keeps every span it was sent, with the resource that sent it. Anything else it answers 400
//! and counts, so that a test sees a request it did not expect.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

use serde_json::Value;

/// Largest export request the receiver reads.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// One exported span, flattened.
#[derive(Debug, Clone)]
pub struct Span {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits; empty for a root span.
    pub parent_span_id: String,
    /// The span's name.
    pub name: String,
    /// The span kind, as the JSON encoding gives it (`2` = server, `4` = producer).
    pub kind: i64,
    /// The span's attributes, each value as text.
    pub attributes: HashMap<String, String>,
    /// The attributes of the resource that exported it (`service.name`…).
    pub resource: HashMap<String, String>,
}

impl Span {
    /// An attribute's value as text, if it has it.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Default)]
struct State {
    spans: Vec<Span>,
    /// Requests that were not a JSON trace export (method, path, content type).
    unexpected: Vec<String>,
}

/// The receiver; it stops accepting when the test process ends.
pub struct Receiver {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl Receiver {
    /// Starts a receiver on a free port.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the OTLP receiver");
        let addr = listener.local_addr().expect("the receiver's address");
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let state = Arc::clone(&shared);
                thread::spawn(move || serve(&state, stream));
            }
        });
        Self { addr, state }
    }

    /// The value for `OTEL_EXPORTER_OTLP_ENDPOINT` (the exporter adds `/v1/traces`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spans
            .clone()
    }

    /// Requests that were not a JSON trace export.
    pub fn unexpected(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unexpected
            .clone()
    }
}

/// Answers the requests of one connection (the exporter keeps it alive) until it closes.
fn serve(state: &Mutex<State>, stream: TcpStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if length > MAX_BODY {
            return;
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let content_type = headers.get("content-type").cloned().unwrap_or_default();
        let is_export = request_line.starts_with("POST /v1/traces ")
            && content_type.starts_with("application/json");
        let spans = is_export
            .then(|| serde_json::from_slice::<Value>(&body).ok())
            .flatten()
            .map(|export| flatten(&export));
        let status = {
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            match spans {
                Some(spans) => {
                    state.spans.extend(spans);
                    "200 OK"
                }
                None => {
                    state
                        .unexpected
                        .push(format!("{} ({content_type})", request_line.trim_end()));
                    "400 Bad Request"
                }
            }
        };
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// The spans of one `ExportTraceServiceRequest` (JSON), each with its resource's attributes.
fn flatten(export: &Value) -> Vec<Span> {
    let mut spans = Vec::new();
    for resource_spans in export["resourceSpans"].as_array().into_iter().flatten() {
        let resource = attributes(&resource_spans["resource"]["attributes"]);
        for scope_spans in resource_spans["scopeSpans"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for span in scope_spans["spans"].as_array().into_iter().flatten() {
                let text = |key: &str| span[key].as_str().unwrap_or_default().to_owned();
                spans.push(Span {
                    trace_id: text("traceId").to_ascii_lowercase(),
                    span_id: text("spanId").to_ascii_lowercase(),
                    parent_span_id: text("parentSpanId").to_ascii_lowercase(),
                    name: text("name"),
                    kind: span["kind"].as_i64().unwrap_or_default(),
                    attributes: attributes(&span["attributes"]),
                    resource: resource.clone(),
                });
            }
        }
    }
    spans
}

/// OTLP's `[{"key", "value": {"stringValue"|"intValue"|…}}]` as text values.
fn attributes(list: &Value) -> HashMap<String, String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|kv| {
            let key = kv["key"].as_str()?.to_owned();
            let value = kv["value"].as_object()?.values().next()?;
            let value = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            Some((key, value))
        })
        .collect()
}
